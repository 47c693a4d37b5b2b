// Progressive enhancement only: every action works without this file.
// 1. Forms with data-confirm ask in a dialog that names the object, then post with
//    confirm=yes (without script the server shows a confirmation page instead).
// 2. Drag and drop: an account onto a domain column fills the grant form and submits it
//    (the server then shows what the grant opens before saving it); a site onto a domain
//    fills the move form and submits it.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (window.confirm(form.getAttribute("data-confirm"))) {
        var c = form.querySelector("input[name=confirm]");
        if (c) { c.value = "yes"; }
      } else {
        ev.preventDefault();
      }
    });
  });

  function wire(dragAttr, dropAttr, formId, dragField, dropField) {
    var form = document.getElementById(formId);
    if (!form) { return; }
    document.querySelectorAll("[" + dragAttr + "]").forEach(function (el) {
      el.addEventListener("dragstart", function (ev) {
        ev.dataTransfer.setData("text/plain", dragAttr + ":" + el.getAttribute(dragAttr));
      });
    });
    document.querySelectorAll("[" + dropAttr + "]").forEach(function (target) {
      target.addEventListener("dragover", function (ev) {
        ev.preventDefault();
        target.classList.add("drop-over");
      });
      target.addEventListener("dragleave", function () { target.classList.remove("drop-over"); });
      target.addEventListener("drop", function (ev) {
        ev.preventDefault();
        target.classList.remove("drop-over");
        var data = ev.dataTransfer.getData("text/plain");
        if (data.indexOf(dragAttr + ":") !== 0) { return; }
        form.querySelector("[name=" + dragField + "]").value = data.slice(dragAttr.length + 1);
        form.querySelector("[name=" + dropField + "]").value = target.getAttribute(dropAttr);
        form.submit();
      });
    });
  }
  wire("data-account", "data-drop-account", "grant", "account", "domain");
  wire("data-site", "data-drop-site", "move-site", "site", "domain");
});
