//! Who this process is, as a lease holder: `<host> <pid> <start> <nonce>`; and whether a process
//! of this host still runs (see [`crate::lease`]).

/// Who holds leases for this process: `<host> <pid> <start> <nonce>`, where `start` is when the
/// process started (clock ticks since boot, from `/proc`), so that a restarted process that got
/// the same pid (pid 1 in a container) is not taken for its earlier life.
pub(crate) fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains(' '))
        .unwrap_or_else(|| "unknown-host".to_owned());
    let pid = std::process::id();
    let start = process_start(&pid.to_string()).unwrap_or_else(|| "0".to_owned());
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    format!("{host} {pid} {start} {}", &nonce[..8])
}

/// When process `pid` started (field 22 of `/proc/<pid>/stat`); `None` when it does not run or
/// this is not Linux.
pub(crate) fn process_start(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19).map(str::to_owned)
}
