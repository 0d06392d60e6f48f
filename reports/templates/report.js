// Sorting and filtering of the unit grid; plain DOM, no libraries, works from file://.
(function () {
  "use strict";
  var grid = document.getElementById("unit-grid");
  if (!grid) { return; }
  var cards = Array.prototype.slice.call(grid.querySelectorAll(".unit-card"));
  var buttons = Array.prototype.slice.call(document.querySelectorAll(".sort-button"));
  var filter = document.getElementById("category-filter");
  var detectorsOnly = document.getElementById("detectors-only");
  var shown = document.getElementById("shown-count");

  function value(card, key, type) {
    var raw = card.getAttribute("data-" + key) || "";
    if (type === "num") {
      var x = parseFloat(raw);
      return isNaN(x) ? -Infinity : x;
    }
    return raw.toLowerCase();
  }

  function sortBy(button, dir) {
    var key = button.getAttribute("data-key");
    var type = button.getAttribute("data-type");
    var sign = dir === "asc" ? 1 : -1;
    var sorted = cards.slice().sort(function (a, b) {
      var va = value(a, key, type), vb = value(b, key, type);
      if (va < vb) { return -sign; }
      if (va > vb) { return sign; }
      // Ties keep a stable, predictable order: by unit number.
      return value(a, "unit", "num") - value(b, "unit", "num");
    });
    sorted.forEach(function (card) { grid.appendChild(card); });
    buttons.forEach(function (b) { b.classList.remove("active"); b.removeAttribute("data-dir"); });
    button.classList.add("active");
    button.setAttribute("data-dir", dir);
  }

  function applyFilter() {
    var category = filter ? filter.value : "";
    var onlyDetectors = detectorsOnly && detectorsOnly.checked;
    var count = 0;
    cards.forEach(function (card) {
      var hide = (category && card.getAttribute("data-category") !== category) ||
                 (onlyDetectors && card.getAttribute("data-detector") !== "1");
      card.classList.toggle("hidden", Boolean(hide));
      if (!hide) { count += 1; }
    });
    if (shown) { shown.textContent = count + " of " + cards.length + " units shown"; }
  }

  buttons.forEach(function (button) {
    button.addEventListener("click", function () {
      var current = button.getAttribute("data-dir");
      var dir = current ? (current === "asc" ? "desc" : "asc") : button.getAttribute("data-default");
      sortBy(button, dir);
    });
  });
  if (filter) { filter.addEventListener("change", applyFilter); }
  if (detectorsOnly) { detectorsOnly.addEventListener("change", applyFilter); }
  applyFilter();
})();
