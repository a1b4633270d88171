"use strict";
// Polls /api/status and redraws the tables. Text goes in with textContent only.
(function () {
  var SVG = "http://www.w3.org/2000/svg";
  function ago(s) {
    s = Math.max(0, Math.floor(s));
    if (s < 120) return s + " s";
    if (s < 7200) return Math.floor(s / 60) + " min";
    if (s < 172800) return Math.floor(s / 3600) + " h";
    return Math.floor(s / 86400) + " d";
  }
  function agoUs(now, at) { return ago((now - at) / 1e6); }
  function dash(v) { return v === undefined || v === null ? "\u2013" : String(v); }
  // The same as the server's: values clamped to range, one value is a flat line across.
  var RSSI = [-130, -30], SNR = [-20, 15];
  function points(v, range, w, h) {
    var min = range[0], max = range[1], span = max > min ? max - min : 1;
    function y(x) { return (h - 2 - (Math.min(Math.max(x, min), max) - min) / span * (h - 4)).toFixed(1); }
    if (v.length === 1) return "2.0," + y(v[0]) + " " + (w - 2).toFixed(1) + "," + y(v[0]);
    var step = v.length > 1 ? (w - 4) / (v.length - 1) : 0;
    return v.map(function (x, i) { return (2 + step * i).toFixed(1) + "," + y(x); }).join(" ");
  }
  function chart(series, w, h, label) {
    var s = document.createElementNS(SVG, "svg");
    s.setAttribute("class", "chart");
    s.setAttribute("width", w); s.setAttribute("height", h);
    s.setAttribute("viewBox", "0 0 " + w + " " + h);
    s.setAttribute("role", "img"); s.setAttribute("aria-label", label);
    series.forEach(function (p) {
      var l = document.createElementNS(SVG, "polyline");
      l.setAttribute("fill", "none"); l.setAttribute("stroke", p[1]);
      l.setAttribute("stroke-width", "1.5"); l.setAttribute("points", points(p[0], p[2], w, h));
      s.appendChild(l);
    });
    return s;
  }
  // cells: strings, or [string, class], or a DOM node.
  function row(cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (c) {
      var td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c);
      else if (Array.isArray(c)) { td.textContent = c[0]; if (c[1]) td.className = c[1]; }
      else td.textContent = c;
      tr.appendChild(td);
    });
    return tr;
  }
  function fill(id, rows, cols) {
    var tb = document.getElementById(id);
    if (!tb) return;
    while (tb.firstChild) tb.removeChild(tb.firstChild);
    rows.forEach(function (r) { tb.appendChild(r); });
    if (!rows.length && cols) {
      var tr = row([["none", "muted"]]);
      tr.firstChild.colSpan = cols;
      tb.appendChild(tr);
    }
    tb.setAttribute("data-src", "live");
  }
  function text(id, t, cls) {
    var e = document.getElementById(id);
    if (e) { e.textContent = t; if (cls !== undefined) e.className = cls; }
  }
  function draw(d) {
    var now = d.now_us;
    text("status", d.status, d.status);
    text("uptime", ago(d.uptime_s));
    text("store", d.store_writable ? "writable" : "NOT writable");
    text("gateways_total", String(d.gateways_total));
    text("devices_total", String(d.devices_total));
    fill("alerts", d.alerts.map(function (a) {
      return row([a.kind, a.subject, agoUs(now, a.since_us) + " ago", [a.id, "muted"]]);
    }), 4);
    fill("gateways", d.gateways.map(function (g) {
      var s = g.stat;
      return row([[g.eui, "mono"], [ago(g.last_seen_s) + " ago", g.online ? "ok" : "bad"],
        [dash(g.push_addr || g.pull_addr), "mono"], String(g.rx_frames),
        s ? s.rxok + " / " + s.rxnb : "\u2013", s ? String(s.txnb) : "\u2013", s ? s.time : "\u2013"]);
    }));
    fill("devices", d.devices.map(function (v) {
      var last = v.signal.length ? v.signal[v.signal.length - 1] : null;
      var c = v.signal.length ? chart([[v.signal.map(function (p) { return p[1]; }), "#1f6fd1", RSSI],
        [v.signal.map(function (p) { return p[2]; }), "#d1741f", SNR]], 120, 28,
        "RSSI and SNR of the last " + v.signal.length + " uplinks") : "";
      return row([v.id, v.application, [v.dev_eui, "mono"],
        v.last_seen_us ? agoUs(now, v.last_seen_us) + " ago" : "not since start",
        dash(v.f_cnt), v.data_rate, last ? last[1] + " dBm / " + last[2] + " dB" : "\u2013",
        c, dash(v.battery)]);
    }));
    fill("streams", d.streams.map(function (s) {
      var c = s.depth_history.length > 1 ? chart([[s.depth_history, "#6a3fb5",
        [0, Math.max.apply(null, [1].concat(s.depth_history))]]], 100, 24,
        "queue depth over time") : "";
      return row([s.name, s.kind, [s.target, "mono"], [s.connected ? "yes" : "no", s.connected ? "ok" : "bad"],
        s.depth + " (" + s.bytes + " B)", s.depth > 0 ? ago(s.oldest_age_s) : "\u2013", c,
        String(s.delivered), String(s.dropped)]);
    }));
    fill("frames", d.frames.map(function (f) {
      var good = f.result === "accepted" || f.result === "valid";
      return row([agoUs(now, f.at_us) + " ago", f.kind, [f.result, good ? "ok" : "bad"], dash(f.device),
        [dash(f.dev_addr), "mono"], dash(f.f_cnt),
        [f.gateway + (f.gateways > 1 ? " +" + (f.gateways - 1) : ""), "mono"],
        f.rssi + " dBm / " + f.snr + " dB", (f.frequency_hz / 1e6).toFixed(1) + " MHz",
        f.data_rate, String(f.size)]);
    }));
    text("live", "live, updated " + new Date(now / 1000).toISOString().slice(11, 19) + " UTC", "ok");
  }
  function poll() {
    fetch("api/status", { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(draw)
      .catch(function (e) { text("live", "not live: " + e.message, "bad"); })
      .then(function () { setTimeout(poll, 5000); });
  }
  poll();
})();
