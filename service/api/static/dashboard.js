// The qforget operations dashboard: fetches /dashboard/data with the API key the user gave and
// draws the figures as SVG. No library, nothing loaded from elsewhere; every text from the data
// goes in through textContent, never as HTML.
"use strict";

(() => {
  const KEY_STORAGE = "qforget.dashboard.apiKey";
  const REFRESH_MS = 30000;
  const SVG_NS = "http://www.w3.org/2000/svg"; // the SVG namespace name, not a resource to load
  const PALETTE = ["#2e6fdb", "#e07b39", "#3a9d5d", "#9b59b6", "#c0392b", "#16a2b8", "#7f8c8d"];
  const EVALUATION_METRICS = ["FA", "RA", "TA", "MIA"];
  const $ = (id) => document.getElementById(id);
  let timer = null;

  // ---- small helpers -------------------------------------------------------------------------

  function svg(name, attributes = {}, text = null) {
    const node = document.createElementNS(SVG_NS, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
    if (text !== null) node.textContent = text;
    return node;
  }

  function cell(text, className = "") {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const sign = seconds < 0 ? "−" : "";
    const s = Math.abs(seconds);
    if (s < 90) return `${sign}${Math.round(s)} s`;
    if (s < 90 * 60) return `${sign}${Math.round(s / 60)} min`;
    if (s < 48 * 3600) return `${sign}${(s / 3600).toFixed(1)} h`;
    return `${sign}${(s / 86400).toFixed(1)} d`;
  }

  function number(value) {
    return String(Number(value.toFixed(2))); // 2, 1.5, 0.25: no trailing zeros
  }

  function sum(rows, field) {
    return rows.reduce((total, row) => total + row[field], 0);
  }

  function niceCeiling(value) {
    if (value <= 0) return 1;
    const magnitude = 10 ** Math.floor(Math.log10(value));
    const step = [1, 2, 2.5, 5, 10].find((m) => m * magnitude >= value);
    return step * magnitude;
  }

  // ---- the one chart: grouped vertical bars --------------------------------------------------

  // categories: x-axis groups; series: [{name, values: [one per category]}]. Each bar is a
  // <rect class="bar"> carrying data-category, data-series and data-value.
  function barChart(container, { categories, series, max = null, format = number }) {
    container.replaceChildren();
    const width = 560, height = 260, left = 46, right = 10, top = 30, bottom = 46;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    container.appendChild(chart);
    const values = series.flatMap((s) => s.values);
    if (!categories.length || !series.length || values.every((v) => v === 0)) {
      chart.appendChild(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" },
                            "no data yet"));
      container.dataset.bars = "0";
      return;
    }
    const top_value = max ?? niceCeiling(Math.max(...values));
    const plotWidth = width - left - right, plotHeight = height - top - bottom;
    const y = (v) => top + plotHeight - (v / top_value) * plotHeight;

    for (let i = 0; i <= 4; i++) {
      const v = (top_value * i) / 4;
      chart.appendChild(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), class: "grid" }));
      chart.appendChild(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, format(v)));
    }
    chart.appendChild(svg("line", { x1: left, x2: width - right, y1: y(0), y2: y(0), class: "axis" }));

    const band = plotWidth / categories.length;
    const barWidth = Math.min(48, (band * 0.8) / series.length);
    let bars = 0;
    categories.forEach((category, c) => {
      const groupStart = left + c * band + (band - barWidth * series.length) / 2;
      series.forEach((s, k) => {
        const value = s.values[c];
        const x = groupStart + k * barWidth;
        const bar = svg("rect", {
          x, y: y(value), width: Math.max(1, barWidth - 2), height: Math.max(0, y(0) - y(value)),
          fill: s.color || PALETTE[k % PALETTE.length], class: "bar",
          "data-category": category, "data-series": s.name, "data-value": value,
        });
        bar.appendChild(svg("title", {}, `${s.name}, ${category}: ${format(value)}`));
        chart.appendChild(bar);
        bars++;
        if (value > 0) {
          chart.appendChild(svg("text", { x: x + barWidth / 2 - 1, y: y(value) - 3, "text-anchor": "middle",
                                          class: "bar-value" }, format(value)));
        }
      });
      const label = category.length > 14 ? `${category.slice(0, 13)}…` : category;
      chart.appendChild(svg("text", { x: left + c * band + band / 2, y: y(0) + 16, "text-anchor": "middle" }, label));
    });

    let legendX = left;
    series.forEach((s, k) => {
      chart.appendChild(svg("rect", { x: legendX, y: 8, width: 10, height: 10,
                                      fill: s.color || PALETTE[k % PALETTE.length] }));
      const text = svg("text", { x: legendX + 14, y: 17 }, s.name);
      chart.appendChild(text);
      legendX += 24 + 7 * s.name.length;
    });
    container.dataset.bars = String(bars);
  }

  // Rows like {model, <category field>, count} as one series per model.
  function seriesByModel(rows, categoryField, categories) {
    const models = [...new Set(rows.map((row) => row.model))];
    return models.map((model) => ({
      name: model,
      values: categories.map((category) => {
        const row = rows.find((r) => r.model === model && r[categoryField] === category);
        return row ? row.count : 0;
      }),
    }));
  }

  // ---- the panels ----------------------------------------------------------------------------

  function setTile(id, text, alert = false) {
    const tile = $(id);
    tile.querySelector(".value").textContent = text;
    tile.classList.toggle("alert", alert);
  }

  function renderTiles(data) {
    const open = data.requests.filter((r) => ["pending", "batched"].includes(r.status));
    const pastDue = sum(data.due, "past_due");
    const oldest = data.due.length ? Math.max(...data.due.map((d) => d.oldest_open_age_seconds)) : null;
    setTile("tile-open", String(sum(open, "count")));
    setTile("tile-past-due", String(pastDue), pastDue > 0);
    setTile("tile-due-soon", String(sum(data.due, "due_soon")));
    setTile("tile-oldest", oldest === null ? "–" : duration(oldest), oldest !== null && oldest > 25 * 86400);
    setTile("tile-held", String(data.held_batches.length), data.held_batches.length > 0);
    const gpu = data.broker.up ? String(data.broker.queues.gpu ?? 0) : "down";
    setTile("tile-queue", gpu, !data.broker.up);
  }

  function renderRequests(data) {
    const statuses = ["pending", "batched", "completed"];
    barChart($("chart-requests"), { categories: statuses, series: seriesByModel(data.requests, "status", statuses) });
  }

  function renderDue(data) {
    const models = data.due.map((d) => d.model);
    const open = (model) => sum(data.requests.filter((r) => r.model === model &&
                                                     ["pending", "batched"].includes(r.status)), "count");
    barChart($("chart-due"), {
      categories: models,
      series: [
        { name: "open", values: models.map(open), color: PALETTE[0] },
        { name: "due within 7 days", values: data.due.map((d) => d.due_soon), color: "#e0a800" },
        { name: "past due", values: data.due.map((d) => d.past_due), color: "#c0392b" },
      ],
    });
  }

  function renderDurations(data) {
    const rows = data.batch_durations;
    const bounds = rows.length ? rows[0].buckets.map((b) => b.le) : [];
    const categories = [...bounds.map((le) => `≤${duration(le)}`), `>${duration(bounds[bounds.length - 1])}`];
    // The histogram is cumulative (as Prometheus has it); each bar is one bucket's own count.
    const series = rows.map((row) => {
      const cumulative = [...row.buckets.map((b) => b.count), row.count];
      return { name: row.model, values: cumulative.map((c, i) => c - (i ? cumulative[i - 1] : 0)) };
    });
    barChart($("chart-durations"), { categories: rows.length ? categories : [], series });
    $("durations-caption").textContent = rows.length
      ? rows.map((r) => `${r.model}: ${r.count} batches, mean ${duration(r.sum_seconds / r.count)}, ` +
                        `newest ${duration(r.last_seconds)}`).join("; ")
      : "No batch has completed yet.";
  }

  function renderQueues(data) {
    const categories = [], values = [];
    for (const [queue, count] of Object.entries(data.broker.queues)) {
      categories.push(`${queue} queue`);
      values.push(count);
    }
    for (const row of data.requests.filter((r) => r.status === "pending")) {
      categories.push(`pending req. ${row.model}`);
      values.push(row.count);
    }
    for (const row of data.pending_samples) {
      categories.push(`pending samples ${row.model}`);
      values.push(row.count);
    }
    barChart($("chart-queues"), { categories, series: [{ name: "waiting", values }] });
    $("broker-caption").textContent = data.broker.up
      ? `Broker: ${data.broker.transport}, answering.`
      : `Broker: ${data.broker.transport}, NOT answering: queue lengths unknown.`;
    $("broker-caption").classList.toggle("error", !data.broker.up);
  }

  function renderBatches(data) {
    const statuses = ["running", "held", "completed", "failed", "discarded"];
    barChart($("chart-batches"), { categories: statuses, series: seriesByModel(data.batches, "status", statuses) });
    const events = [...new Set(data.batch_events.map((e) => e.event))].sort();
    barChart($("chart-events"), { categories: events, series: seriesByModel(data.batch_events, "event", events) });
  }

  function renderEvaluations(data) {
    const container = $("evaluations");
    container.replaceChildren();
    for (const deployment of data.deployments) {
      const block = document.createElement("div");
      block.className = "evaluation";
      block.id = `evaluation-${deployment.model}`;
      const title = document.createElement("h3");
      const evaluation = deployment.evaluation;
      const kind = evaluation && evaluation.approximate ? "approximate reference" : "reference";
      title.textContent = `${deployment.model}: deployed version ${deployment.version_id}` +
        (evaluation ? `, ${kind} version ${evaluation.reference_id}, evaluated ${duration(evaluation.age_seconds)} ago`
                    : ": not evaluated against a retrain reference yet");
      block.appendChild(title);
      if (evaluation && evaluation.approximate) {
        // Interim figures (docs/audit.md, Approximate references): never shown as the full reference's.
        const label = document.createElement("p");
        label.className = "approximate";
        label.textContent = "approximate: against a reference trained on a coreset of the retain set, until the " +
          "full reference is recorded; these figures can be off by several points of AG";
        block.appendChild(label);
      }
      container.appendChild(block);
      if (!evaluation) continue;

      const chart = document.createElement("div");
      chart.className = "chart evaluation-chart";
      block.appendChild(chart);
      const metrics = EVALUATION_METRICS.filter((m) => m in evaluation.metrics && m in evaluation.reference_metrics);
      barChart(chart, {
        categories: metrics, max: 100, format: (v) => v.toFixed(v % 1 ? 1 : 0),
        series: [
          { name: `deployed v${deployment.version_id}`, values: metrics.map((m) => evaluation.metrics[m]) },
          { name: `${evaluation.approximate ? "approximate " : ""}reference v${evaluation.reference_id}`,
            values: metrics.map((m) => evaluation.reference_metrics[m]) },
        ],
      });

      const table = document.createElement("table");
      table.className = "gaps";
      const head = table.createTHead().insertRow();
      for (const name of ["metric", "deployed %", "reference %", "gap"]) {
        const th = document.createElement("th");
        th.textContent = name;
        head.appendChild(th);
      }
      const body = table.createTBody();
      for (const metric of [...metrics, "AG"]) {
        const row = body.insertRow();
        row.dataset.metric = metric;
        row.appendChild(cell(metric));
        row.appendChild(cell(metric in evaluation.metrics ? evaluation.metrics[metric].toFixed(2) : "", "number"));
        row.appendChild(cell(metric in evaluation.reference_metrics ? evaluation.reference_metrics[metric].toFixed(2) : "",
                             "number"));
        row.appendChild(cell(metric in evaluation.gaps ? evaluation.gaps[metric].toFixed(2) : "–", "number"));
      }
      block.appendChild(table);
    }
  }

  function renderTable(id, rows, columns, emptyText) {
    const body = $(id).tBodies[0];
    body.replaceChildren();
    if (!rows.length) {
      const row = body.insertRow();
      const td = cell(emptyText, "empty");
      td.colSpan = columns;
      row.appendChild(td);
      return;
    }
    for (const cells of rows) {
      const row = body.insertRow();
      for (const td of cells) row.appendChild(td);
    }
  }

  function renderLeasesAndHolds(data) {
    renderTable("leases", data.leases.map((lease) => [
      cell(lease.model), cell(String(lease.batch_id), "number"), cell(lease.owner ?? "–"),
      cell(String(lease.attempt), "number"),
      cell(lease.remaining_seconds === null ? "–"
             : lease.remaining_seconds < 0 ? `expired ${duration(-lease.remaining_seconds)} ago`
             : duration(lease.remaining_seconds),
           lease.remaining_seconds !== null && lease.remaining_seconds < 0 ? "number expired" : "number"),
    ]), 5, "No batch is running.");
    renderTable("held", data.held_batches.map((held) => [
      cell(held.model), cell(String(held.batch_id), "number"), cell(duration(held.held_seconds), "number"),
      cell(held.reason ?? ""),
    ]), 4, "No batch is waiting for review.");
  }

  function render(data) {
    renderTiles(data);
    renderRequests(data);
    renderDue(data);
    renderDurations(data);
    renderQueues(data);
    renderBatches(data);
    renderEvaluations(data);
    renderLeasesAndHolds(data);
    document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
  }

  // ---- key handling and refresh --------------------------------------------------------------

  function setStatus(text, isError = false) {
    $("status").textContent = text;
    $("status").classList.toggle("error", isError);
  }

  function askForKey(message = "") {
    clearTimeout(timer);
    sessionStorage.removeItem(KEY_STORAGE);
    $("dashboard").hidden = true;
    $("forget-key").hidden = true;
    $("key-form").hidden = false;
    $("key-error").textContent = message;
    setStatus("Not connected.");
    $("api-key").focus();
  }

  async function refresh() {
    clearTimeout(timer);
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (!key) return askForKey();
    let response;
    try {
      response = await fetch("/dashboard/data", { headers: { Authorization: `Bearer ${key}` }, cache: "no-store" });
    } catch (error) {
      setStatus(`The API did not answer (${error.message}); retrying in ${REFRESH_MS / 1000} s.`, true);
      timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => ({}));
      return askForKey(`The API refused the key: ${body.detail ?? response.statusText}`);
    }
    if (!response.ok) {
      setStatus(`The API answered ${response.status}; retrying in ${REFRESH_MS / 1000} s.`, true);
      timer = setTimeout(refresh, REFRESH_MS);
      return;
    }
    const data = await response.json();
    $("key-form").hidden = true;
    $("dashboard").hidden = false;
    $("forget-key").hidden = false;
    render(data);
    setStatus(`Updated ${new Date(data.generated_at).toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000} s.`);
    timer = setTimeout(refresh, REFRESH_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      $("api-key").value = "";
      refresh();
    });
    $("forget-key").addEventListener("click", () => askForKey());
    refresh();
  });
})();
