// Copy buttons and delete confirmations. Nothing else: pages work without it.
function copyByHand(text) {
  const t = document.createElement("textarea");
  t.value = text;
  document.body.appendChild(t);
  t.select();
  document.execCommand("copy");
  t.remove();
}
document.addEventListener("click", (e) => {
  const b = e.target.closest("button.copy");
  if (!b) return;
  const text = b.dataset.copy;
  const done = () => { b.textContent = "Copied"; setTimeout(() => { b.textContent = "Copy"; }, 1500); };
  // The clipboard API needs a secure context and, in some browsers, focus; fall back to a
  // selection copy when it is missing or refuses.
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => { copyByHand(text); done(); });
  } else {
    copyByHand(text);
    done();
  }
});
document.addEventListener("submit", (e) => {
  const f = e.target.closest("form[data-confirm]");
  if (f && !window.confirm(f.dataset.confirm)) e.preventDefault();
});
