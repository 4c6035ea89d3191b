// Turns one /dashboard/data answer into the page. Every shown number is written by setVal(),
// which also keeps the raw value in data-value (what tests and scrapers read, unformatted).
// The DOM is built with textContent only: replica URLs and model names are never parsed as HTML.
"use strict";

const Fmt = {
  num(v, digits = 1) {
    if (v == null) return "–";
    if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(2) + " M";
    if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + " k";
    if (Number.isInteger(v) || Math.abs(v) >= 1000) return v.toFixed(0);
    return v.toFixed(Math.abs(v) >= 100 ? 0 : digits);
  },
  int(v) { return v == null ? "–" : Math.round(v).toLocaleString("en-US"); },
  pct(v) { return v == null ? "–" : (100 * v).toFixed(1) + " %"; },
  ms(seconds) {
    if (seconds == null) return "–";
    const ms = seconds * 1000;
    return ms >= 1000 ? (ms / 1000).toFixed(2) + " s" : ms.toFixed(ms >= 100 ? 0 : 1) + " ms";
  },
  bytes(v) {
    if (v == null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(i ? 1 : 0) + " " + units[i];
  },
  dur(s) {
    if (s == null) return "–";
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  },
};

function $(id) { return document.getElementById(id); }

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "cls") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// A number into an element (found by id, or given): formatted text, raw value in data-value.
function setVal(target, value, fmt = Fmt.num) {
  const node = typeof target === "string" ? $(target) : target;
  if (!node) return node;
  node.textContent = fmt(value);
  node.dataset.value = value == null ? "" : String(value);
  return node;
}

function numCell(id, value, fmt) {
  const td = el("td", { id });
  setVal(td, value, fmt);
  return td;
}

// A bar's fill; `alarm`: turn amber over 75 %, red over 90 % (memory, not relative load).
function setBar(node, fraction, alarm = true) {
  const f = Math.max(0, Math.min(1, fraction || 0));
  node.style.width = (100 * f).toFixed(1) + "%";  // CSSOM: allowed under the page's CSP
  node.className = "fill" + (!alarm ? "" : f > 0.9 ? " bad" : f > 0.75 ? " warn" : "");
}

const Render = {
  common(d) {
    const g = d.gauges, t = d.totals, r = d.rates;
    setVal("running", g.running, Fmt.int);
    setVal("waiting", g.waiting, Fmt.int);
    setVal("prompt-tps", r.prompt_tokens_per_s);
    setVal("gen-tps", r.generation_tokens_per_s);
    setVal("requests-tps", r.requests_finished_per_s, v => Fmt.num(v, 2));
    setVal("prompt-tokens-total", t.prompt_tokens, Fmt.int);
    setVal("gen-tokens-total", t.generation_tokens, Fmt.int);
    setVal("kv-usage", g.kv_cache_usage, Fmt.pct);
    setBar($("kv-bar"), g.kv_cache_usage);
    setVal("prefix-hit-rate", r.prefix_cache_hit_rate, Fmt.pct);
    setVal("prefix-hit-rate-lifetime", d.prefix_cache_hit_rate, Fmt.pct);
    setVal("prefix-hits", t.prefix_cache_hits, Fmt.int);
    setVal("prefix-queries", t.prefix_cache_queries, Fmt.int);
    setVal("requests-finished", t.requests_finished, Fmt.int);
    setVal("requests-rejected", t.requests_rejected, Fmt.int);
    setVal("preemptions", t.preemptions, Fmt.int);
    setVal("preemptions-rate", r.preemptions_per_s, v => Fmt.num(v, 2));
    const reasons = Object.entries(d.finished_by_reason || {}).filter(([, v]) => v > 0);
    $("finish-reasons").textContent = reasons.map(([k, v]) => `${k} ${Fmt.int(v)}`).join(" · ");
    this.latency(d.latency, d.recent_window_s);
    this.gpus(d.gpus || []);
    this.sparks(d.history || {});
  },

  latency(lat, windowS) {
    const rows = [["ttft", "Time to first token"], ["itl", "Inter-token latency"],
                  ["e2e", "End to end"], ["queue", "Queue time"]];
    const body = $("latency-body");
    body.replaceChildren();
    for (const [key, label] of rows) {
      const entry = lat[key] || {};
      const tr = el("tr", {}, [el("td", { text: label })]);
      for (const part of ["recent", "lifetime"]) {
        for (const q of ["p50", "p90", "p99"]) {
          tr.append(numCell(`${key}-${part}-${q}`, (entry[part] || {})[q], Fmt.ms));
        }
      }
      tr.append(numCell(`${key}-lifetime-count`, (entry.lifetime || {}).count, Fmt.int));
      body.append(tr);
    }
    $("latency-window").textContent = windowS == null ? "(recent: waiting for a second reading)"
      : `(recent: last ${Fmt.dur(windowS)}, from histogram buckets)`;
  },

  gpus(gpus) {
    const box = $("gpus");
    box.replaceChildren();
    if (!gpus.length) {
      box.append(el("div", { cls: "muted", text: "No GPU reported (CPU device, or no probe)." }));
      return;
    }
    gpus.forEach(g => {
      const id = "gpu-" + (g.host ? `${g.host}-` : "") + g.gpu;
      const frac = g.total_bytes ? g.used_bytes / g.total_bytes : 0;
      const fill = el("div", { cls: "fill" });
      setBar(fill, frac);
      const used = el("span", { id: id + "-used" });
      setVal(used, g.used_bytes, Fmt.bytes);
      const total = el("span", { id: id + "-total" });
      setVal(total, g.total_bytes, Fmt.bytes);
      box.append(el("div", { cls: "gpu" }, [
        el("div", { text: (g.host ? `${g.host} · ` : "") + `GPU ${g.gpu}` +
                          (g.replica != null ? ` (replica ${g.replica})` : "") }),
        el("div", { cls: "bar" }, [fill]),
        el("div", {}, [used, " of ", total, ` (${Fmt.pct(frac)})`]),
      ]));
    });
  },

  sparks(h) {
    Spark.draw($("spark-requests"), [h.running, h.waiting], { format: Fmt.int });
    Spark.draw($("spark-prompt"), [h.prompt_tokens_per_s]);
    Spark.draw($("spark-gen"), [h.generation_tokens_per_s]);
    Spark.draw($("spark-kv"), [h.kv_cache_usage], { max: 1, format: Fmt.pct });
    Spark.draw($("spark-hit"), [h.prefix_cache_hit_rate], { max: 1, format: Fmt.pct });
    Spark.draw($("spark-latency"), [h.ttft_p50, h.itl_p50], { format: Fmt.ms });
  },

  // One engine's TP x PP grid: a row per pipeline stage, a box per rank.
  layoutGrid(layout, idPrefix) {
    const box = el("div");
    const busy = layout.pp_stage_busy_ratio || {};
    for (const stage of layout.stages || []) {
      const [start, end] = stage.layers || [];
      const parts = [];
      if (stage.embedding) parts.push("embedding");
      if (start != null) parts.push(`layers ${start}–${end - 1} (${end - start})`);
      if (stage.lm_head) parts.push("norm + LM head");
      const label = el("div", { cls: "label" }, [
        el("b", { text: `stage ${stage.stage}` }), ": " + parts.join(", ")]);
      if (busy[String(stage.stage)] != null) {
        label.append(el("div", { cls: "muted", text: `busy ${Fmt.pct(busy[String(stage.stage)])}` }));
      }
      const row = el("div", { cls: "stage", id: `${idPrefix}stage-${stage.stage}` }, [label]);
      for (const r of stage.ranks) {
        const where = r.device + (r.host_gpu != null ? ` (GPU ${r.host_gpu})` : "");
        row.append(el("div", { cls: "rank" + (r.driver ? " driver" : ""),
                               id: `${idPrefix}rank-${r.rank}` }, [
          el("b", { text: `rank ${r.rank}` }), ` · TP ${r.tp_rank}`,
          el("div", { text: `${where} · node ${r.node}` }),
          el("div", { cls: "muted", text: r.driver ? "samples (driver)" : "" }),
        ]));
      }
      box.append(row);
    }
    return box;
  },

  // "TP 2 × PP 2 × DP 1 · ..." with the three sizes in elements of their own (ids when given).
  layoutSummary(l, ids = false) {
    const out = [];
    for (const [key, label] of [["tp", "TP"], ["pp", "PP"], ["dp", "DP"]]) {
      if (out.length) out.push(" × ");
      const n = el("b", ids ? { id: "layout-" + key } : {});
      out.push(label + " ", setVal(n, l[key], Fmt.int));
    }
    const unit = l.device === "cuda" ? (l.world_size === 1 ? "GPU" : "GPUs")
                                     : (l.world_size === 1 ? "process" : "processes");
    let rest = ` · ${l.world_size} ${unit} per replica · ${l.nnodes} node(s)` +
      ` · ${l.architecture || ""} ${l.dtype || ""}` +
      (l.num_layers != null ? ` · ${l.num_layers} layers` : "");
    if (l.tp_comm_time_ratio != null) rest += ` · TP comm ${Fmt.pct(l.tp_comm_time_ratio)} of step`;
    out.push(rest);
    return out;
  },

  serverLayout(l) {
    $("layout-summary").replaceChildren(...this.layoutSummary(l, true));
    $("layout").replaceChildren(this.layoutGrid(l, ""));
  },

  routerLayout(layout) {
    const box = $("layout");
    box.replaceChildren();
    $("layout-summary").replaceChildren("DP ",
      setVal(el("b", { id: "layout-dp" }), layout.dp, Fmt.int), " replicas");
    for (const rep of layout.replicas) {
      const head = el("h4", { text: `replica ${rep.index} · ${rep.url}` });
      const part = el("div", { cls: "replica-layout" }, [head]);
      if (rep.layout) {
        head.append(el("span", { cls: "muted small" }, ["  ", ...this.layoutSummary(rep.layout)]));
        part.append(this.layoutGrid(rep.layout, `r${rep.index}-`));
      } else {
        part.append(el("div", { cls: "muted", text: "layout unknown (no dashboard data from it)" }));
      }
      box.append(part);
    }
  },

  replicas(d) {
    $("replicas-panel").hidden = false;
    $("replicas-summary").textContent =
      `${d.server.healthy_replicas} of ${d.server.replicas} healthy`;
    const maxLoad = Math.max(1, ...d.replicas.map(r => r.load));
    const body = $("replicas-body");
    body.replaceChildren();
    for (const r of d.replicas) {
      const p = `replica-${r.index}-`;
      const data = r.data || {};
      const health = el("td", { id: p + "health", "data-value": r.healthy ? "1" : "0" }, [
        el("span", { cls: "dot " + (r.healthy ? "ok" : "bad") }), r.healthy ? "ok" : r.status]);
      const fill = el("div", { cls: "fill" });
      setBar(fill, r.load / maxLoad, false);  // relative to the busiest replica
      const load = el("td", {}, [el("div", { cls: "bar" }, [fill])]);
      load.append(setVal(el("span", { id: p + "load" }), r.load, Fmt.num));
      const spark = el("canvas", { cls: "spark mini" });
      const layout = data.layout ? `TP ${data.layout.tp} × PP ${data.layout.pp}` : (r.data_error || "–");
      body.append(el("tr", { id: p + "row" }, [
        el("td", { text: String(r.index) }), el("td", { cls: "url", text: r.url }), health, load,
        numCell(p + "running", r.running, Fmt.int), numCell(p + "waiting", r.waiting, Fmt.int),
        numCell(p + "in-flight", r.in_flight, Fmt.int),
        numCell(p + "kv", r.kv_cache_usage, Fmt.pct),
        numCell(p + "gen-tps", (data.rates || {}).generation_tokens_per_s),
        el("td", {}, [spark]),
        numCell(p + "ttft-p50", ((data.latency || {}).ttft || {}).recent?.p50, Fmt.ms),
        numCell(p + "requests", r.requests, Fmt.int), numCell(p + "failures", r.failures, Fmt.int),
        el("td", { text: layout }),
      ]));
      Spark.draw(spark, [(data.spark || {}).generation_tokens_per_s], { label: false });
    }
  },
};
