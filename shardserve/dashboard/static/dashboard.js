// The poll loop and the API key. The page (and this file) hold no key: when /dashboard/data
// answers 401 the page asks for one, keeps it in sessionStorage (this tab only, gone when the tab
// closes) and sends it as "Authorization: Bearer" to this origin only. A link may carry the key
// in its #fragment (#key=...): fragments are never sent to the server, and the page moves the key
// to sessionStorage and drops it from the address bar at once.
"use strict";

(() => {
  const KEY_STORE = "shardserve.dashboard.key";
  const params = new URLSearchParams(location.search);
  const intervalMs = Math.max(200, Number(params.get("interval")) || 1000);
  let polls = 0;
  let timer = null;

  function storedKey() {
    try { return sessionStorage.getItem(KEY_STORE); } catch (e) { return null; }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    } catch (e) { /* storage disabled: the key lives only until the page reloads */ }
    memoryKey = key || null;
  }
  let memoryKey = storedKey();

  function takeKeyFromFragment() {
    const m = location.hash.match(/(?:^#|&)key=([^&]*)/);
    if (!m) return;
    storeKey(decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }

  function showKeyForm(message) {
    $("key-message").textContent = message;
    $("key-form").hidden = false;
    $("main").classList.add("locked");
    $("status").textContent = "needs key";
    $("status").className = "pill warn";
    $("key-input").focus();
  }

  function showError(text) {
    const banner = $("error");
    banner.hidden = !text;
    banner.textContent = text || "";
  }

  async function poll() {
    const headers = { "Accept": "application/json" };
    if (memoryKey) headers["Authorization"] = "Bearer " + memoryKey;
    let response;
    try {
      response = await fetch("dashboard/data", { headers, cache: "no-store", credentials: "omit" });
    } catch (e) {
      showError("Cannot reach the server: " + e.message);
      $("status").textContent = "unreachable";
      $("status").className = "pill bad";
      return schedule();
    }
    if (response.status === 401) {
      const had = !!memoryKey;
      storeKey(null);
      showKeyForm(had ? "That key was refused; enter the server's API key."
                      : "This server needs its API key to show its numbers.");
      return;  // polling resumes when a key is entered
    }
    if (!response.ok) {
      showError(`/dashboard/data answered HTTP ${response.status}`);
      return schedule();
    }
    let data;
    try {
      data = await response.json();
    } catch (e) {  // a proxy's error page, a body cut off by a restart: report, keep polling
      showError("/dashboard/data did not answer JSON: " + e.message);
      return schedule();
    }
    showError("");
    $("key-form").hidden = true;
    $("main").classList.remove("locked");
    $("forget-key").hidden = !memoryKey;
    try {
      render(data);
    } catch (e) {
      showError("Could not draw the page: " + e.message);
    }
    polls += 1;
    document.body.dataset.polls = String(polls);
    schedule();
  }

  function render(d) {
    const router = d.kind === "router";
    $("kind").textContent = router ? "router" : "server";
    $("footer-kind").textContent = router ? "router's replicas" : "server";
    $("model").textContent = router ? `${d.server.replicas} replicas` : d.server.model;
    const status = $("status");
    status.textContent = d.server.status;
    status.className = "pill " + (d.server.status === "ok" ? "ok"
                                  : d.server.status === "loading" || d.server.status === "draining"
                                    ? "warn" : "bad");
    $("updated").textContent = new Date(d.time * 1000).toLocaleTimeString();
    $("updated").dataset.value = String(d.time);
    $("uptime-wrap").hidden = router;
    if (!router) setVal("uptime", d.server.uptime_s, Fmt.dur);
    setVal("in-flight", router ? d.replicas.reduce((a, r) => a + r.in_flight, 0)
                               : d.server.in_flight, Fmt.int);
    $("kv-detail").textContent = router ? "mean over replicas"
      : `blocks of ${d.server.block_size} tokens · at most ${d.server.max_num_seqs} sequences` +
        (d.server.prefix_caching ? "" : " · prefix caching off");
    Render.common(d);
    if (router) {
      Render.replicas(d);
      Render.routerLayout(d.layout);
    } else {
      Render.serverLayout(d.layout);
    }
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, intervalMs);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("interval").textContent = String(intervalMs / 1000);
    takeKeyFromFragment();
    $("key-form").addEventListener("submit", event => {
      event.preventDefault();  // nothing is submitted anywhere: the key goes to sessionStorage
      const key = $("key-input").value.trim();
      $("key-input").value = "";
      if (!key) return;
      storeKey(key);
      $("key-form").hidden = true;
      poll();
    });
    $("forget-key").addEventListener("click", () => { storeKey(null); location.reload(); });
    poll();
  });
})();
