// LQF Serve dashboard: small enhancements over server-rendered pages. Every page works
// without this file, except the live parts (progress over SSE, upload progress).
"use strict";

function setProgress(bar, text, fraction) {
  bar.value = fraction;
  if (text) text.textContent = Math.round(fraction * 100) + " %";
}

// Job page: progress, stage and curve, live from the job's Server-Sent Events.
function liveJob(box) {
  if (box.dataset.final === "true" || !window.EventSource) return;
  const bar = document.getElementById("job-progress");
  const text = document.getElementById("job-progress-text");
  const stage = document.getElementById("job-stage");
  const curve = document.getElementById("job-curve");
  let refreshing = false, pending = false;
  function refreshCurve() {
    if (refreshing) { pending = true; return; }
    refreshing = true;
    fetch(box.dataset.curve, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.text() : null))
      .then((html) => { if (html !== null) curve.innerHTML = html; })
      .catch(() => {})
      .finally(() => { refreshing = false; if (pending) { pending = false; refreshCurve(); } });
  }
  const source = new EventSource(box.dataset.events);
  source.addEventListener("progress", (e) => {
    const ev = JSON.parse(e.data), p = ev.progress || {};
    setProgress(bar, text, p.fraction || 0);
    stage.textContent = (p.stage || "") + " " + (p.step || 0) + "/" + (p.total || 0);
    if (ev.metrics && (p.stage === "solve" || p.stage === "epoch")) refreshCurve();
  });
  source.addEventListener("status", (e) => {
    const ev = JSON.parse(e.data);
    const final = ["succeeded", "failed", "cancelled"];
    if (ev.status && final.includes(ev.status)) {
      source.close();
      window.location.reload();  // the final page: result, model link, full curve
    }
  });
  source.onerror = () => { /* EventSource reconnects by itself, from Last-Event-ID */ };
}

// Upload form: the same POST, sent by XHR so that its progress can be shown.
function uploadWithProgress(form) {
  const bar = document.getElementById(form.dataset.progress);
  const text = document.getElementById(form.dataset.progress + "-text");
  form.addEventListener("submit", (event) => {
    if (!window.XMLHttpRequest || !window.FormData) return;
    event.preventDefault();
    const xhr = new XMLHttpRequest();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) {
        bar.value = Math.round((100 * e.loaded) / e.total);
        text.textContent = bar.value + " %";
      }
    });
    xhr.addEventListener("load", () => {
      if (xhr.status < 400) {
        window.location.assign(xhr.responseURL);  // the new dataset's page
      } else {  // the server's error page: show its message here
        const page = new DOMParser().parseFromString(xhr.responseText, "text/html");
        const message = page.querySelector(".error");
        button.disabled = false;
        text.textContent = message ? message.textContent : "upload failed (" + xhr.status + ")";
        text.classList.add("error");
      }
    });
    xhr.addEventListener("error", () => {
      button.disabled = false;
      text.textContent = "upload failed: the connection broke";
    });
    xhr.open("POST", form.action);
    xhr.send(new FormData(form));
  });
}

// Model page: the posterior-predictive reliability diagram, once the posterior is built.
function loadFragment(box, attempt) {
  const status = document.getElementById("reliability-status");
  fetch(box.dataset.src, { credentials: "same-origin" }).then((r) => {
    if (r.status === 503 && attempt < 40) {
      const wait = Math.min(30, Number(r.headers.get("Retry-After")) || 3);
      if (status) status.textContent = "The posterior is being built; trying again in " + wait + " s…";
      setTimeout(() => loadFragment(box, attempt + 1), wait * 1000);
      return null;
    }
    return r.text().then((html) => {
      if (r.ok) box.innerHTML = html;
      else if (status) status.textContent = "The posterior predictive is not available (status " + r.status + ").";
    });
  }).catch(() => { if (status) status.textContent = "Could not load the posterior predictive."; });
}

// Try-it: drop an image anywhere on the form, and it is sent.
function dropzone(form) {
  const input = form.querySelector("input[type=file]");
  ["dragenter", "dragover"].forEach((t) => form.addEventListener(t, (e) => {
    e.preventDefault(); form.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((t) => form.addEventListener(t, () => form.classList.remove("dragging")));
  form.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      form.requestSubmit();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const job = document.getElementById("job");
  if (job) liveJob(job);
  const upload = document.getElementById("upload-form");
  if (upload) uploadWithProgress(upload);
  const reliability = document.getElementById("reliability");
  if (reliability && reliability.dataset.src) loadFragment(reliability, 0);
  const tryForm = document.getElementById("try-form");
  if (tryForm) dropzone(tryForm);
});
