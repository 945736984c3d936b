// pacsbridge web page: plain JavaScript, no build step.
// The API token lives in this tab's sessionStorage only (never in a URL, never in a cookie).
// Every value from the server is put in the page with textContent, never as HTML.
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "pacsbridge.token";
const MUTE_KEY = "pacsbridge.mute";          // localStorage: this reader's choice, kept across sessions
const OVERDUE_S = 4 * 3600;                   // same limit as the red "waiting" column
const TITLE = "pacsbridge worklist";
const $ = (id) => document.getElementById(id);
const state = { view: null, items: [], selected: 0, item: null, instance: null, timer: null, me: null,
                imageUrl: null, seenUrgent: null, alertItem: null, audio: null, receivedOffset: 0,
                receivedUrl: null };
const RECEIVED_PAGE = 100;

// -- API ------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, { method = "GET", body = null, raw = false } = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new ApiError(401, "not signed in");
  const headers = { Authorization: "Bearer " + token };
  if (body !== null) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === null ? null : JSON.stringify(body),
                                  cache: "no-store" });
  if (!res.ok) {
    let detail = res.statusText;
    try { const j = await res.json(); detail = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail); }
    catch (e) { /* not JSON */ }
    throw new ApiError(res.status, detail);
  }
  return raw ? res : res.json();
}

function handleError(err) {
  if (err instanceof ApiError && err.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    show("signin");
    message("Your token was not accepted (wrong, expired or revoked). Please sign in again.", "error");
    return;
  }
  if (err instanceof ApiError && err.status === 403) {
    message("Not allowed for your role: " + err.message, "error");
    return;
  }
  if (err instanceof ApiError) { message(err.message, "error"); return; }
  message("Cannot reach pacsbridge (" + err.message + "). Retrying automatically.", "error");
}

function message(text, kind = "info") {
  const m = $("message");
  if (!text) { m.hidden = true; m.textContent = ""; return; }
  m.textContent = text;
  m.className = kind;
  m.hidden = false;
}

// -- formatting -----------------------------------------------------------------------------------
function age(seconds) {
  const m = Math.floor(seconds / 60);
  if (m < 1) return "<1 min";
  if (m < 60) return m + " min";
  const h = Math.floor(m / 60);
  return h + " h " + String(m % 60).padStart(2, "0") + " min";
}
function band(p) { return p >= 0.8 ? "high" : p >= 0.5 ? "mid" : "low"; }
function patientName(pn) { return pn ? pn.replace(/\^+/g, " ").trim() : "(no name)"; }
function patientAge(a) {
  if (!a) return "";
  const m = /^0*(\d+)([DWMY])$/.exec(a);
  return m ? m[1] + " " + { D: "d", W: "wk", M: "mo", Y: "y" }[m[2]] : a;
}
function statusText(it) {
  if (it.status === "in_progress") return "being read by " + it.claimed_by;
  if (it.status === "completed") return "read: " + (it.finding || "").replace("_", " ");
  if (it.status === "canceled") return "canceled";
  return "waiting";
}
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

// -- views ----------------------------------------------------------------------------------------
function show(view) {
  state.view = view;
  for (const v of ["signin", "worklist", "item", "stats", "received", "events"]) $(v + "-view").hidden = v !== view;
  $("nav").hidden = view === "signin";
  $("nav-worklist").classList.toggle("active", view === "worklist" || view === "item");
  $("nav-stats").classList.toggle("active", view === "stats");
  $("nav-received").classList.toggle("active", view === "received");
  $("nav-events").classList.toggle("active", view === "events");
  if (view === "signin") {
    // The worklist poll (which also raises the alerts) runs in every view while signed in.
    clearInterval(state.timer);
    state.timer = null;
    state.seenUrgent = null;
    setAlert(null);
    document.title = TITLE;
    $("token").value = "";
    $("token").focus();
  }
  if (view === "worklist") loadWorklist();
  if (view === "stats") loadStats();
  if (view === "received") { state.receivedOffset = 0; loadReceived(); }
  if (view === "events") loadEvents();
}

async function signIn(token) {
  sessionStorage.setItem(TOKEN_KEY, token.trim());
  try {
    state.me = await api("/api/me");
    $("who").textContent = state.me.name + " (" + state.me.role + ")";
    $("mode-banner").hidden = state.me.mode !== "shadow";
    message("");
    const admin = state.me.role === "admin";
    for (const b of document.querySelectorAll(".admin-only")) b.hidden = !admin;
    $("drift-banner").hidden = true;
    if (admin) checkDrift();
    if (state.me.role === "monitor") { show("stats"); $("nav-worklist").hidden = true; }
    else {
      $("nav-worklist").hidden = false;
      $("mute-box").hidden = false;
      $("mute").checked = localStorage.getItem(MUTE_KEY) === "1";
      $("alerts-enable").hidden = !("Notification" in window) || Notification.permission !== "default";
      show("worklist");
      clearInterval(state.timer);
      state.timer = setInterval(loadWorklist, REFRESH_MS);
    }
  } catch (err) {
    sessionStorage.removeItem(TOKEN_KEY);
    if (err instanceof ApiError && err.status === 401) {
      show("signin");
      message("That token was not accepted (wrong, expired or revoked). Check it with your admin.", "error");
    } else handleError(err);
  }
}

async function loadWorklist() {
  try {
    const status = $("show-closed").checked ? "all" : "open";
    state.items = await api("/api/worklist?status=" + status + "&limit=500");
    checkAlerts(state.items);
    if (state.view !== "worklist") return;
    renderWorklist();
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    if ($("message").className === "error" && !$("message").hidden) message("");
  } catch (err) { handleError(err); }
}

function renderWorklist() {
  const body = $("worklist").querySelector("tbody");
  const focusedId = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.id : null;
  body.replaceChildren();
  state.selected = Math.min(state.selected, Math.max(state.items.length - 1, 0));
  state.items.forEach((it, i) => {
    const score = scoreCell(it);
    const who = el("td", { class: "patient" }, patientName(it.patient_name));
    if (it.requested_priority === "STAT") who.append(el("span", { class: "badge stat", text: "STAT" }));
    else if (it.requested_priority === "HIGH") who.append(el("span", { class: "badge hi", text: "HIGH" }));
    const wait = el("td", { class: "waiting" + (it.waiting_s > 4 * 3600 ? " long" : ""), text: age(it.waiting_s) });
    const row = el("tr", { "data-id": String(it.id), tabindex: "0",
                           title: "priority " + it.priority.toFixed(2) + ": AI score, order urgency and waiting time" },
      el("td", { class: "rank", text: String(i + 1) }), el("td", {}, score), who,
      el("td", { text: patientAge(it.patient_age) }), el("td", { text: it.accession_number || "" }),
      el("td", { text: [it.modality, it.study_description].filter(Boolean).join(" · ") }), wait,
      el("td", { class: "status " + it.status, text: statusText(it) }), el("td", { class: "viewer-col" }, viewerLink(it, "open")));
    if (i === state.selected) row.classList.add("selected");
    row.addEventListener("click", () => openItem(it.id));
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") openItem(it.id); });
    body.append(row);
    if (focusedId && focusedId === String(it.id)) row.focus();
  });
  $("count").textContent = "(" + state.items.length + ")";
  $("empty").hidden = state.items.length > 0;
  $("worklist").hidden = state.items.length === 0;
}

// A blinded audit item (a negative sampled for a quality read) shows no AI score until it is completed.
const AUDIT_LABEL = "Quality audit (blinded)";
function scoreCell(it) {
  if (it.blinded || it.probability === null) return el("div", { class: "score audit", text: AUDIT_LABEL });
  const p = it.probability;
  const fill = el("i", { class: band(p) });
  fill.style.width = Math.round(p * 100) + "%";  // CSSOM, not a style attribute (the page's CSP forbids those)
  const score = el("div", { class: "score " + band(p) }, el("span", { class: "meter" }, fill),
    el("span", { text: Math.round(p * 100) + "%" }));
  if (it.kind === "audit") score.append(el("span", { class: "badge audit", text: "audit" }));
  return score;
}

function viewerLink(it, text) {
  if (!it.viewer_url) return "";
  const a = el("a", { href: it.viewer_url, target: "_blank", rel: "noopener noreferrer", class: "viewer-link",
                      title: "Open this study in the image viewer (new tab)" },
                el("span", { class: "wide-only", text: text + " " }), "\u2197");
  a.addEventListener("click", (e) => e.stopPropagation());  // the link, not the row, takes the click
  a.addEventListener("keydown", (e) => e.stopPropagation());
  return a;
}

// -- alerts: a new STAT/HIGH or overdue study -------------------------------------------------------
function isUrgent(it) {
  return it.status === "scheduled" && !it.blinded && (it.requested_priority === "STAT" || it.requested_priority === "HIGH"
    || it.waiting_s > OVERDUE_S);
}
function urgentWhy(it) {
  return it.requested_priority === "STAT" || it.requested_priority === "HIGH" ? it.requested_priority : "overdue";
}

function checkAlerts(items) {
  const urgent = items.filter(isUrgent);
  document.title = urgent.length ? "(" + urgent.length + ") urgent · " + TITLE : TITLE;
  const ids = new Set(urgent.map((it) => it.id));
  const first = state.seenUrgent === null;
  const fresh = urgent.filter((it) => !first && !state.seenUrgent.has(it.id));
  state.seenUrgent = ids;
  if (state.alertItem !== null && !ids.has(state.alertItem)) setAlert(null);  // claimed or done meanwhile
  if (first && urgent.length) { setAlert(urgent[0], urgent.length, false); return; }
  if (!fresh.length) return;
  setAlert(fresh[0], urgent.length, true);
  if (localStorage.getItem(MUTE_KEY) === "1") return;
  beep();
  if ("Notification" in window && Notification.permission === "granted") {
    // No patient name in a desktop notification: it can show on a shared screen. Accession only.
    const it = fresh[0];
    const n = new Notification("pacsbridge: new " + urgentWhy(it) + " study", {
      body: (it.accession_number ? "Accession " + it.accession_number + ", " : "") + "AI score "
        + Math.round(it.probability * 100) + "%" + (fresh.length > 1 ? " (+" + (fresh.length - 1) + " more)" : ""),
      tag: "pacsbridge-urgent" });
    n.onclick = () => { window.focus(); openItem(it.id); };
  }
}

function setAlert(it, count = 0, isNew = false) {
  state.alertItem = it ? it.id : null;
  $("alert").hidden = !it;
  if (!it) return;
  $("alert-text").textContent = (isNew ? "New " + urgentWhy(it) + " study: " : urgentWhy(it) + " study waiting: ")
    + patientName(it.patient_name) + (it.accession_number ? " · " + it.accession_number : "") + " · AI score "
    + Math.round(it.probability * 100) + "%" + (count > 1 ? " (" + count + " urgent in all)" : "");
}

function beep() {
  // A short tone made here (WebAudio): nothing is downloaded. Browsers allow sound only after the
  // reader has interacted with the page (e.g. "Enable alerts"); otherwise this stays silent.
  try {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return;
    state.audio = state.audio || new Ctx();
    const ctx = state.audio, osc = ctx.createOscillator(), gain = ctx.createGain();
    osc.type = "sine";
    osc.frequency.value = 880;
    gain.gain.setValueAtTime(0.0001, ctx.currentTime);
    gain.gain.exponentialRampToValueAtTime(0.25, ctx.currentTime + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, ctx.currentTime + 0.35);
    osc.connect(gain).connect(ctx.destination);
    osc.start();
    osc.stop(ctx.currentTime + 0.4);
  } catch (e) { /* no sound device: the notice and the title still show */ }
}

async function enableAlerts() {
  try {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (Ctx) { state.audio = state.audio || new Ctx(); await state.audio.resume(); }
    if ("Notification" in window && Notification.permission === "default") await Notification.requestPermission();
  } catch (e) { /* refused: the page notice and the title still work */ }
  $("alerts-enable").hidden = !("Notification" in window) || Notification.permission !== "default";
  message("Alerts on: a new STAT, HIGH or overdue study shows here, in the tab title"
    + ("Notification" in window && Notification.permission === "granted" ? ", as a desktop notification" : "")
    + " and with a short sound (mute turns sound and notification off).", "info");
}

function moveSelection(delta) {
  if (!state.items.length) return;
  state.selected = Math.max(0, Math.min(state.items.length - 1, state.selected + delta));
  renderWorklist();
  const row = $("worklist").querySelectorAll("tbody tr")[state.selected];
  if (row) { row.focus(); row.scrollIntoView({ block: "nearest" }); }
}

async function openItem(id) {
  try {
    state.item = await api("/api/worklist/" + id);
    state.instance = state.item.instances.length ? state.item.instances[0].id : null;
    $("heatmap").checked = false;
    show("item");
    renderItem();
    loadImage();
  } catch (err) { handleError(err); }
}

function renderItem() {
  const it = state.item;
  $("item-title").textContent = patientName(it.patient_name) + (it.accession_number ? " · " + it.accession_number : "");
  const facts = $("facts");
  facts.replaceChildren();
  const add = (k, v) => { if (v !== null && v !== undefined && v !== "") facts.append(el("dt", { text: k }), el("dd", { text: String(v) })); };
  if (it.blinded) add("Kind", AUDIT_LABEL + ": read it without the AI score; the score is shown once you complete it");
  else add("AI score", Math.round(it.probability * 100) + "% (highest image)" + (it.kind === "audit" ? " · quality audit" : ""));
  add("Patient ID", it.patient_id);
  add("Age / sex", [patientAge(it.patient_age), it.patient_sex].filter(Boolean).join(" / "));
  add("Study", [it.modality, it.study_description, it.study_date].filter(Boolean).join(" · "));
  add("Requested", it.requested_priority);
  add("Waiting", age(it.waiting_s));
  add("Status", statusText(it));
  if (it.claim_expires_at && it.status === "in_progress") add("Claim until", new Date(it.claim_expires_at).toLocaleTimeString());
  if (it.comment) add("Comment", it.comment);
  if (it.cancel_reason) add("Cancel reason", it.cancel_reason);
  add("Study UID", it.study_instance_uid);

  const mine = it.status === "in_progress" && state.me && it.claimed_by === state.me.name;
  const admin = state.me && state.me.role === "admin";
  $("claim-state").textContent = it.status === "scheduled" ? "Not claimed. Claim it to read it."
    : it.status === "in_progress" ? (mine ? "You are reading this study." : "Being read by " + it.claimed_by + ".")
    : "This item is " + it.status + ".";
  $("claim").hidden = !(it.status === "scheduled" || mine);
  $("claim").firstChild.textContent = mine ? "Renew claim " : "Claim ";
  $("release").hidden = !(mine || (admin && it.status === "in_progress"));
  $("open-viewer").hidden = !it.viewer_url;
  if (it.viewer_url) $("open-viewer").href = it.viewer_url;
  $("complete-form").hidden = !(mine || (admin && it.status === "in_progress"));

  const list = $("instances");
  const why = $("instance-reasons");
  list.replaceChildren();
  why.replaceChildren();
  it.instances.forEach((inst, i) => {
    const label = "Image " + (i + 1) + (it.blinded ? "" : ": " + (inst.probability !== null
      ? Math.round(inst.probability * 100) + "%" : inst.state.replace("_", " ")));
    const reasons = reasonsOf(inst);
    const b = el("button", { type: "button", class: inst.id === state.instance ? "active" : "", text: label,
      title: reasons.length ? reasons.map((r) => r.text).join("\n") : (inst.model_id ? "model " + inst.model_id +
        ", threshold " + inst.threshold + ", calibration " + (inst.calibration || "model") : "") });
    b.addEventListener("click", () => { state.instance = inst.id; renderItem(); loadImage(); });
    list.append(b);
    if (reasons.length) {
      why.append(el("div", { "data-id": String(inst.id) },
        el("span", { class: "muted", text: "Image " + (i + 1) + " " + inst.state.replace("_", " ") + ":" }),
        reasonList(reasons)));
    }
  });
  $("heatmap").disabled = !it.heatmap_available;
  $("heatmap-note").textContent = it.heatmap_available ? ""
    : it.blinded ? "(hidden until the audit read is completed)" : "(this model provides no heatmap)";
  const history = $("history");
  history.replaceChildren();
  for (const h of it.history || []) {
    history.append(el("li", {}, el("time", { datetime: h.at || "", text: h.at ? localTime(h.at) : "" }), " " + h.text));
  }
}

// Why an image was refused or failed: every reason the server recorded (rows from before reasons
// were recorded carry only the joined text).
function reasonsOf(inst) {
  if (inst.state !== "not_analysed" && inst.state !== "failed") return [];
  if (inst.reasons && inst.reasons.length) return inst.reasons;
  return inst.reason ? [{ code: "other", text: inst.reason }] : [];
}

function reasonList(reasons) {  // one line per reason, as text (never HTML)
  return el("ul", { class: "reasons" }, ...reasons.map((r) => el("li", { text: r.text })));
}

async function loadImage() {
  const img = $("image");
  if (state.imageUrl) { URL.revokeObjectURL(state.imageUrl); state.imageUrl = null; }
  img.removeAttribute("src");
  $("image-note").textContent = "";
  // Say what the colours mean whenever they are shown, next to the switch (above the image, in view).
  $("heatmap-legend").hidden = !$("heatmap").checked;
  $("image").classList.toggle("with-legend", $("heatmap").checked);
  if (state.instance === null) { $("image-note").textContent = "no image"; return; }
  const overlay = $("heatmap").checked ? "&overlay=heatmap" : "";
  try {
    const res = await api("/api/instances/" + state.instance + "/image.png?size=1024" + overlay, { raw: true });
    state.imageUrl = URL.createObjectURL(await res.blob());
    img.src = state.imageUrl;
  } catch (err) {
    if (err instanceof ApiError && err.status !== 401) $("image-note").textContent = err.message;
    else handleError(err);
  }
}

async function act(action, body = null) {
  try {
    state.item = await api("/api/worklist/" + state.item.id + "/" + action, { method: "POST", body });
    if (action === "complete") {
      // An audit read is unblinded once completed: say what the AI had scored.
      const unblinded = state.item.kind === "audit" && state.item.probability !== null
        ? " Quality audit: the AI had scored this study " + Math.round(state.item.probability * 100) + "% (not flagged)."
        : "";
      message("Completed: " + body.finding.replace("_", " ") + "." + unblinded + " Back to the worklist.", "info");
      show("worklist");
      return;
    }
    message(action === "claim" ? "Claimed. You are reading this study." : "Released to the worklist.", "info");
    renderItem();
  } catch (err) {
    handleError(err);
    if (state.item) openItemQuiet(state.item.id);
  }
}

async function openItemQuiet(id) {
  try { state.item = await api("/api/worklist/" + id); renderItem(); } catch (e) { /* shown already */ }
}

function localTime(iso) {
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

// -- admin: everything received --------------------------------------------------------------------
function dayStart(value) { return value ? new Date(value + "T00:00:00").toISOString() : null; }  // local midnight

async function loadReceived() {
  const q = new URLSearchParams({ limit: String(RECEIVED_PAGE), offset: String(state.receivedOffset) });
  if ($("received-state").value) q.set("state", $("received-state").value);
  if ($("received-from").value) q.set("since", dayStart($("received-from").value));
  if ($("received-to").value) {
    const end = new Date($("received-to").value + "T00:00:00");
    end.setDate(end.getDate() + 1);  // "to" includes that whole day
    q.set("until", end.toISOString());
  }
  try {
    const rows = await api("/api/instances?" + q.toString());
    const body = $("received").querySelector("tbody");
    body.replaceChildren();
    for (const r of rows) {
      const reasons = r.blinded ? [] : reasonsOf(r);
      const outcome = el("td", { class: "outcome" + (r.positive ? " flagged" : "") });
      if (reasons.length) outcome.append(reasonList(reasons));
      else {
        outcome.textContent = r.blinded ? AUDIT_LABEL : r.probability !== null
          ? Math.round(r.probability * 100) + "% " + (r.positive ? "flagged" : "not flagged")
          : (r.reason || (r.state === "received" || r.state === "processing" ? "waiting for the AI" : ""));
      }
      const row = el("tr", { "data-id": String(r.id), tabindex: "0", title: r.sop_instance_uid },
        el("td", { text: localTime(r.received_at) }), el("td", { text: r.calling_ae || "" }),
        el("td", { class: "state-" + r.state, text: r.state.replace("_", " ") }),
        outcome, el("td", { class: "uid", text: r.study_instance_uid }));
      row.addEventListener("click", () => previewReceived(r, row));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter") previewReceived(r, row); });
      body.append(row);
    }
    $("received-count").textContent = "(" + (rows.length ? (state.receivedOffset + 1) + "–" + (state.receivedOffset + rows.length) : "0") + ")";
    $("received-empty").hidden = rows.length > 0;
    $("received-prev").disabled = state.receivedOffset === 0;
    $("received-next").disabled = rows.length < RECEIVED_PAGE;
  } catch (err) { handleError(err); }
}

async function previewReceived(r, row) {
  for (const tr of $("received").querySelectorAll("tbody tr")) tr.classList.toggle("selected", tr === row);
  $("received-preview").hidden = false;
  const img = $("received-image");
  if (state.receivedUrl) { URL.revokeObjectURL(state.receivedUrl); state.receivedUrl = null; }
  img.removeAttribute("src");
  $("received-note").textContent = [r.modality, r.calling_ae ? "from " + r.calling_ae : "", r.model_id].filter(Boolean).join(" · ");
  if (!r.file_kept) { $("received-note").textContent = "The file was deleted by retention."; return; }
  try {
    const res = await api(r.image_url + "?size=768", { raw: true });
    state.receivedUrl = URL.createObjectURL(await res.blob());
    img.src = state.receivedUrl;
  } catch (err) {
    if (err instanceof ApiError && err.status !== 401) $("received-note").textContent = err.message;
    else handleError(err);
  }
}

// -- admin: the audit trail ------------------------------------------------------------------------
async function loadEvents() {
  const q = new URLSearchParams({ limit: "500" });
  if ($("events-kind").value) q.set("kind", $("events-kind").value);
  if ($("events-since").value) q.set("since", $("events-since").value);
  try {
    const rows = await api("/api/events?" + q.toString());
    const body = $("events-table").querySelector("tbody");
    body.replaceChildren();
    for (const e of rows) {
      body.append(el("tr", { class: "level-" + e.level },
        el("td", { text: localTime(e.at) }), el("td", { class: "level", text: e.level }), el("td", { text: e.kind }),
        el("td", { text: e.actor || e.peer || "" }), el("td", { class: "detail", text: e.detail || "" })));
    }
    $("events-count").textContent = "(" + rows.length + ")";
    $("events-empty").hidden = rows.length > 0;
  } catch (err) { handleError(err); }
}

// A rate with its 95 % interval and n, e.g. "80% (61–91%, n=30)"; "–" while unknown.
function rateText(value, ci, n) {
  if (value === null || value === undefined) return "–";
  const pct = (x) => Math.round(x * 100) + "%";
  return pct(value) + (ci ? " (" + pct(ci[0]) + "–" + pct(ci[1]) + ", n=" + n + ")" : "");
}

// Admins: a banner while a drift alarm is on (the input no longer looks like the validation data).
function showDrift(drift) {
  const on = drift && drift.alarm && state.me && state.me.role === "admin";
  $("drift-banner").hidden = !on;
  if (on) {
    const pct = (x) => (x === null || x === undefined ? "–" : Math.round(x * 1000) / 10 + "%");
    const names = drift.signals.filter((s) => s.alarm).map((s) => s.name + " " + pct(s.value) +
      " (reference " + pct(s.reference) + ", limit " + pct(s.limit) + ")");
    $("drift-text").textContent = "Drift alarm: " + names.join("; ") + ". See \"Monitoring at your site\" in docs/site-validation.md.";
  }
}

async function checkDrift() {
  try { showDrift((await api("/api/stats")).drift); } catch (err) { /* the banner is a hint; the page goes on */ }
}

async function loadStats() {
  try {
    const data = await api("/api/stats");
    showDrift(data.drift);
    $("stats-mode").hidden = data.mode !== "shadow";
    const body = $("stats").querySelector("tbody");
    body.replaceChildren();
    for (const m of data.models) {
      const t = m.receipt_to_completion_s;
      const s = m.sensitivity;
      body.append(el("tr", {}, ...[m.model_id + (m.calibration && m.calibration !== "model" ? " (" + m.calibration + ")" : ""),
        m.scored, m.flagged, m.completed.pneumonia, m.completed.no_pneumonia,
        m.completed.other, m.canceled, rateText(m.ppv, m.ppv_ci, m.completed_total),
        rateText(s.value, s.ci, s.n), rateText(m.npv.value, m.npv.ci, m.npv.n),
        t.p50 === null ? "–" : age(t.p50), t.p95 === null ? "–" : age(t.p95)].map((v) => el("td", { text: String(v) }))));
    }
    drawWeekly($("stats-weekly"), await api("/api/stats/weekly?weeks=12"));  // charts.js
  } catch (err) { handleError(err); }
}

// -- wiring ---------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (e) => { e.preventDefault(); signIn($("token").value); });
  $("signout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); message(""); show("signin"); });
  $("nav-worklist").addEventListener("click", () => { message(""); show("worklist"); });
  $("nav-stats").addEventListener("click", () => { message(""); show("stats"); });
  $("nav-received").addEventListener("click", () => { message(""); show("received"); });
  $("nav-events").addEventListener("click", () => { message(""); show("events"); });
  for (const id of ["received-state", "received-from", "received-to"]) {
    $(id).addEventListener("change", () => { state.receivedOffset = 0; loadReceived(); });
  }
  $("received-prev").addEventListener("click", () => { state.receivedOffset = Math.max(0, state.receivedOffset - RECEIVED_PAGE); loadReceived(); });
  $("received-next").addEventListener("click", () => { state.receivedOffset += RECEIVED_PAGE; loadReceived(); });
  $("events-kind").addEventListener("change", loadEvents);
  $("events-since").addEventListener("change", loadEvents);
  $("alerts-enable").addEventListener("click", enableAlerts);
  $("mute").addEventListener("change", () => localStorage.setItem(MUTE_KEY, $("mute").checked ? "1" : "0"));
  $("alert-open").addEventListener("click", () => { if (state.alertItem !== null) openItem(state.alertItem); setAlert(null); });
  $("alert-dismiss").addEventListener("click", () => setAlert(null));
  $("back").addEventListener("click", () => { message(""); show("worklist"); });
  $("show-closed").addEventListener("change", loadWorklist);
  $("claim").addEventListener("click", () => act("claim"));
  $("release").addEventListener("click", () => act("release"));
  $("heatmap").addEventListener("change", loadImage);
  $("complete-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = document.querySelector("input[name=finding]:checked");
    if (!f) { message("Choose a finding first (1, 2 or 3).", "error"); return; }
    act("complete", { finding: f.value, comment: $("comment").value.trim() || null });
  });
  document.addEventListener("keydown", (e) => {
    const typing = ["INPUT", "TEXTAREA"].includes(document.activeElement.tagName) && document.activeElement.type !== "radio"
      && document.activeElement.type !== "checkbox";
    if (e.key === "Escape" && state.view === "item") { show("worklist"); return; }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    if (state.view === "worklist") {
      if (e.key === "ArrowDown" || e.key === "j") { e.preventDefault(); moveSelection(1); }
      else if (e.key === "ArrowUp" || e.key === "k") { e.preventDefault(); moveSelection(-1); }
      else if (e.key === "Enter" && state.items[state.selected] && document.activeElement.tagName !== "TR") openItem(state.items[state.selected].id);
      else if (e.key === "s") show("stats");
    } else if (state.view === "item") {
      if (e.key === "c" && !$("claim").hidden) act("claim");
      else if (e.key === "h" && !$("heatmap").disabled) { $("heatmap").checked = !$("heatmap").checked; loadImage(); }
      else if (["1", "2", "3"].includes(e.key) && !$("complete-form").hidden) {
        const r = document.querySelectorAll("input[name=finding]")[Number(e.key) - 1];
        r.checked = true; r.focus();
      }
    } else if (state.view === "stats" && e.key === "w" && state.me && state.me.role !== "monitor") show("worklist");
  });
  if (sessionStorage.getItem(TOKEN_KEY)) signIn(sessionStorage.getItem(TOKEN_KEY)); else show("signin");
});
