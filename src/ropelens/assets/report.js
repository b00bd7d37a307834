(function () {
  var charts = Array.prototype.slice.call(document.querySelectorAll(".vega-chart"));
  function done(ok, failed) {
    document.body.setAttribute("data-charts", "done");
    document.body.setAttribute("data-charts-ok", String(ok));
    document.body.setAttribute("data-charts-failed", String(failed));
  }
  if (typeof vegaEmbed !== "function") {
    charts.forEach(function (el) { el.remove(); });
    console.warn("ropelens report: Vega-Embed unavailable; showing static PNGs");
    done(0, charts.length);
    return;
  }
  var ok = 0, failed = 0;
  var jobs = charts.map(function (el) {
    var spec = JSON.parse(document.getElementById(el.dataset.specId).textContent);
    var opts = {renderer: "svg", actions: {export: true, source: true, compiled: false,
                editor: false}};
    return vegaEmbed(el, spec, opts).then(function () {
      ok += 1;
      el.closest("figure").classList.add("live");
    }).catch(function (err) {
      failed += 1;
      el.remove();
      console.warn("ropelens report: chart " + el.dataset.specId + " shows its PNG: " + err);
    });
  });
  Promise.all(jobs).then(function () { done(ok, failed); });
})();
