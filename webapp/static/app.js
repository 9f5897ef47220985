// Progressive enhancement of the search form: drag and drop, a preview, a size check; and a busy
// state for the results form. Without JavaScript both are plain multipart posts and work the same.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // The results form re-posts the photo when an attribute is clicked: show that it is busy.
  // (Its buttons stay enabled: a button disabled during submit would drop its own value.)
  const refine = document.querySelector("form.refine");
  if (refine) {
    refine.addEventListener("submit", () => refine.classList.add("is-busy"));
    window.addEventListener("pageshow", () => refine.classList.remove("is-busy"));
  }

  const form = document.querySelector("form.upload");
  if (!form) return;
  const input = form.querySelector("input[type=file]");
  const zone = form.querySelector(".dropzone");
  const preview = form.querySelector(".dropzone-preview");
  const text = form.querySelector(".dropzone-text");
  const button = form.querySelector("button[type=submit]");
  const maxBytes = Number(form.dataset.maxBytes || 0);
  let previewUrl = null;

  function showChosen() {
    const file = input.files && input.files[0];
    if (!file) return;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.hidden = false;
    text.textContent = file.name;
  }

  input.addEventListener("change", showChosen);

  ["dragenter", "dragover"].forEach((name) =>
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("is-dragging");
    }),
  );
  ["dragleave", "drop"].forEach((name) =>
    zone.addEventListener(name, () => zone.classList.remove("is-dragging")),
  );
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      showChosen();
    }
  });

  form.addEventListener("submit", (event) => {
    const file = input.files && input.files[0];
    if (file && maxBytes && file.size > maxBytes) {
      event.preventDefault();
      text.textContent = `That file is larger than ${maxBytes / 1e6} MB; please choose a smaller one.`;
      return;
    }
    button.disabled = true;
    button.textContent = "Searching…";
  });

  // Coming back with the browser's back button must not leave the button disabled.
  window.addEventListener("pageshow", () => {
    button.disabled = false;
    button.textContent = "Find similar items";
  });
});
