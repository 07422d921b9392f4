// mxguard TLS report dashboard: the one script of its pages (served from the dashboard itself,
// allowed by its Content-Security-Policy as script-src 'self'). It only makes the range
// selector submit itself; everything else works without it. It never builds HTML from
// strings: the pages are rendered and escaped by the server.
"use strict";

document.documentElement.classList.add("js");

document.addEventListener("DOMContentLoaded", () => {
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => {
      if (select.form) {
        select.form.submit();
      }
    });
  }
});
