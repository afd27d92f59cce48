// nixfleet dashboard: re-fetches this page every few seconds and swaps its <main>, so
// the filters, the scroll position and the focus stay where they are. Without
// JavaScript, a <noscript> meta refresh reloads the page instead.
(function () {
  "use strict";
  var main = document.getElementById("live");
  if (!main || !window.fetch || !window.DOMParser) { return; }
  var secs = parseInt(main.getAttribute("data-refresh"), 10);
  if (!(secs > 0)) { return; }

  function banner(text) {
    var old = document.getElementById("refresh-error");
    if (old) { old.parentNode.removeChild(old); }
    if (!text) { return; }
    var div = document.createElement("div");
    div.id = "refresh-error";
    div.className = "banner error";
    div.setAttribute("role", "alert");
    div.textContent = text;
    main.parentNode.insertBefore(div, main);
  }

  function refresh() {
    fetch(window.location.href, { cache: "no-store", credentials: "same-origin" })
      .then(function (response) { return response.text(); })
      .then(function (text) {
        var next = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        if (!next) { throw new Error("no content"); }
        var focused = document.activeElement;
        var href = focused && main.contains(focused) ? focused.getAttribute("href") : null;
        main.innerHTML = next.innerHTML;
        banner(null);
        if (href) {
          var links = main.querySelectorAll("a[href]");
          for (var i = 0; i < links.length; i++) {
            if (links[i].getAttribute("href") === href) { links[i].focus(); break; }
          }
        }
      })
      .catch(function () {
        banner("The dashboard is not answering (is `nixfleet dashboard` still running?); retrying.");
      })
      .then(function () { window.setTimeout(refresh, secs * 1000); });
  }

  window.setTimeout(refresh, secs * 1000);
})();
