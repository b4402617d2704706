"use strict";
// Placeholder: the full page comes next.
document.getElementById("app").textContent = "admin page";
