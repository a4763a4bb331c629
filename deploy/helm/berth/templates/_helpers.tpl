{{- define "berth.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "berth.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "berth.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "berth.secretName" -}}
{{- printf "%s-secrets" (include "berth.fullname" .) -}}
{{- end -}}

{{- define "berth.authSecret" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecret }}{{- else -}}{{ include "berth.secretName" . }}{{- end -}}
{{- end -}}

{{- define "berth.storageSecret" -}}
{{- if .Values.storage.existingSecret -}}{{ .Values.storage.existingSecret }}{{- else -}}{{ include "berth.secretName" . }}{{- end -}}
{{- end -}}

{{- /* Replicated mode: metadata in PostgreSQL, so a Deployment of stateless pods. */ -}}
{{- define "berth.replicated" -}}
{{- if eq .Values.metadata.backend "postgres" -}}true{{- end -}}
{{- end -}}

{{- /* Refuses values that cannot work, before anything is rendered. */ -}}
{{- define "berth.validate" -}}
{{- if not (has .Values.metadata.backend (list "sqlite" "postgres")) -}}
{{- fail "metadata.backend must be sqlite or postgres" -}}
{{- end -}}
{{- if and (gt (int .Values.replicaCount) 1) (not (include "berth.replicated" .)) -}}
{{- fail "replicaCount > 1 needs metadata.backend=postgres (SQLite serves one process)" -}}
{{- end -}}
{{- if include "berth.replicated" . -}}
{{- if eq .Values.storage.backend "filesystem" -}}
{{- fail "metadata.backend=postgres (replicas) needs an object store: storage.backend s3, azure or gcs" -}}
{{- end -}}
{{- if not .Values.metadata.existingSecret -}}
{{- fail "metadata.existingSecret: name a Secret with key `url` (postgres://user:password@host:5432/db)" -}}
{{- end -}}
{{- if and (eq .Values.auth.mode "token") (not (or .Values.auth.tokenKey .Values.auth.existingSecret)) -}}
{{- fail "auth.mode=token with replicas: every replica must sign with one key; set auth.tokenKey or auth.existingSecret (with token.key)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* The pod, the same for the StatefulSet (one process, SQLite on its volume) and the
Deployment (replicas). */ -}}
{{- define "berth.pod" -}}
metadata:
  labels:
    {{- include "berth.selector" . | nindent 4 }}
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    prometheus.io/scrape: "true"
    prometheus.io/port: "5000"
    prometheus.io/path: /metrics
spec:
  terminationGracePeriodSeconds: 60
  {{- if include "berth.replicated" . }}
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "berth.selector" . | nindent 16 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    fsGroup: 65532
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: berth
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["serve", "--config", "/etc/berth/berth.toml"]
      {{- if include "berth.replicated" . }}
      env:
        # Other replicas stream a blob this one is fetching from upstream from here.
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: BERTH_PEER_URL
          value: "http://$(POD_IP):5000"
      {{- end }}
      ports:
        - name: http
          containerPort: 5000
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        periodSeconds: 5
      livenessProbe:
        httpGet:
          path: /livez
          port: http
        periodSeconds: 10
        failureThreshold: 6
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: ["ALL"]
      volumeMounts:
        - name: data
          mountPath: /var/lib/berth
        - name: config
          mountPath: /etc/berth
          readOnly: true
        {{- if ne .Values.auth.mode "none" }}
        - name: auth
          mountPath: /run/secrets/berth-auth
          readOnly: true
        {{- end }}
        {{- if or .Values.storage.secretAccessKey .Values.storage.existingSecret }}
        - name: storage
          mountPath: /run/secrets/berth-storage
          readOnly: true
        {{- end }}
        {{- if include "berth.replicated" . }}
        - name: metadata
          mountPath: /run/secrets/berth-metadata
          readOnly: true
        {{- end }}
        {{- range .Values.proxy.upstreams }}
        {{- if .passwordSecret }}
        - name: upstream-{{ .name | replace "." "-" | replace ":" "-" }}
          mountPath: /run/secrets/berth-upstream-{{ .name | replace "." "-" | replace ":" "-" }}
          readOnly: true
        {{- end }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "berth.fullname" . }}
    {{- if include "berth.replicated" . }}
    # Replicas keep nothing of their own: the cache's download spool and temporary files.
    - name: data
      emptyDir: {}
    - name: metadata
      secret:
        secretName: {{ .Values.metadata.existingSecret }}
    {{- end }}
    {{- if ne .Values.auth.mode "none" }}
    - name: auth
      secret:
        secretName: {{ include "berth.authSecret" . }}
    {{- end }}
    {{- if or .Values.storage.secretAccessKey .Values.storage.existingSecret }}
    - name: storage
      secret:
        secretName: {{ include "berth.storageSecret" . }}
    {{- end }}
    {{- range .Values.proxy.upstreams }}
    {{- if .passwordSecret }}
    - name: upstream-{{ .name | replace "." "-" | replace ":" "-" }}
      secret:
        secretName: {{ .passwordSecret }}
    {{- end }}
    {{- end }}
{{- end -}}
