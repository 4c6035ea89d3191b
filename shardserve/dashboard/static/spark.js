// Sparklines on <canvas>, drawn by hand (no chart library: the page loads nothing from elsewhere).
// Spark.draw(canvas, [values, values2, ...]) draws each series over the same x range; null
// values leave a gap. The y axis starts at 0 and ends at the largest value (or opts.max).
"use strict";

const Spark = (() => {
  const COLORS = ["#2f6fdb", "#e0832f", "#1f9d55", "#8e44ad"];

  function draw(canvas, seriesList, opts = {}) {
    // Size the bitmap to the element's CSS box at the screen's pixel ratio: sharp on HiDPI.
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 200, height = canvas.clientHeight || 40;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const n = Math.max(0, ...seriesList.map(s => (s || []).length));
    let max = opts.max || 0;
    if (!opts.max) {
      for (const s of seriesList) for (const v of s || []) if (v != null && v > max) max = v;
    }
    if (n < 2) {
      ctx.fillStyle = "#9aa3b1";
      ctx.font = "11px sans-serif";
      ctx.fillText("collecting…", 4, height / 2 + 4);
      return;
    }
    if (max <= 0) max = 1;
    const pad = 3;
    const x = i => pad + (width - 2 * pad) * i / (n - 1);
    const y = v => height - pad - (height - 2 * pad) * Math.min(v, max) / max;
    // Baseline, and the scale's top value so the shape can be read.
    ctx.strokeStyle = "#e2e6ec";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(pad, height - pad + 0.5);
    ctx.lineTo(width - pad, height - pad + 0.5);
    ctx.stroke();
    if (opts.label !== false) {
      ctx.fillStyle = "#9aa3b1";
      ctx.font = "10px sans-serif";
      const text = opts.format ? opts.format(max) : String(+max.toPrecision(3));
      ctx.fillText(text, pad + 1, 10);  // top left: the newest point is at the right
    }
    seriesList.forEach((s, k) => {
      if (!s) return;
      const color = COLORS[k % COLORS.length];
      const offset = n - s.length;  // shorter series are right-aligned (newest at the right)
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let drawing = false, last = null;
      s.forEach((v, i) => {
        if (v == null) { drawing = false; return; }
        const px = x(i + offset), py = y(v);
        if (drawing) ctx.lineTo(px, py); else ctx.moveTo(px, py);
        drawing = true;
        last = [px, py];
      });
      ctx.stroke();
      const known = s.map((v, i) => v == null ? -1 : i).filter(i => i >= 0);
      if (k === 0 && known.length > 1) {  // a light fill under the first series, where known
        const lo = known[0], hi = known[known.length - 1];
        ctx.globalAlpha = 0.08;
        ctx.fillStyle = color;
        ctx.beginPath();
        ctx.moveTo(x(lo + offset), height - pad);
        for (let i = lo; i <= hi; i++) ctx.lineTo(x(i + offset), y(s[i] == null ? 0 : s[i]));
        ctx.lineTo(x(hi + offset), height - pad);
        ctx.closePath();
        ctx.fill();
        ctx.globalAlpha = 1;
      }
      if (last) {
        ctx.fillStyle = color;
        ctx.beginPath();
        ctx.arc(last[0], last[1], 2.2, 0, 2 * Math.PI);
        ctx.fill();
      }
    });
  }

  return { draw };
})();
