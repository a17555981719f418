"""The explorer's page: one HTML file, its CSS and JavaScript inline, no framework, nothing fetched.

`/*DATA*/` is replaced by the site's JSON (pipeline.report.explorer.site_data). The script draws
the view the address's `#` part names (`#latents`, `#latent/<j>`, `#classes`, `#class/<name>`;
`#latents?purity=0.5&set=c3&sort=rate&desc=1` sets the index's filters and order) with DOM calls
only (text is never parsed as HTML), and marks what it drew for tests: `body[data-view]`,
`tr.latent-row` / `tr.class-row` in the indexes, `img.thumb-img` for every thumbnail, and, once
the page has loaded, `body[data-images]`, `body[data-images-loaded]` and `body[data-load-ms]`.
A thumbnail is a crop of its latent's strip (`object-position`), so a latent's images are one file.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Latent explorer</title>
<style>
:root { --fg: #1f2328; --muted: #6b7280; --line: #e5e7eb; --accent: #2563eb; --pos: 47, 158, 68; --neg: 224, 49, 49; }
body { margin: 0; color: var(--fg); font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header { display: flex; flex-wrap: wrap; gap: .4rem 1.5rem; align-items: baseline; padding: .6rem 1rem;
         background: #f6f8fa; border-bottom: 1px solid var(--line); }
header strong { font-size: 16px; }
header nav a { margin-right: 1rem; font-weight: 600; }
header nav a.active { color: var(--fg); text-decoration: none; border-bottom: 2px solid var(--accent); }
#summary { color: var(--muted); margin: 0; }
main { padding: .5rem 1rem 2rem; max-width: 1280px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
h1 { font-size: 22px; margin: .6rem 0 .3rem; }
h2 { font-size: 16px; margin: 1.2rem 0 .4rem; }
h3 { font-size: 14px; margin: .8rem 0 .3rem; font-weight: 600; }
.muted, .help { color: var(--muted); }
.chip { display: inline-block; margin-left: .5rem; padding: 0 .5rem; border-radius: 1rem; background: #eef2ff; font-size: 14px;
        vertical-align: middle; }
.controls { display: flex; flex-wrap: wrap; gap: .4rem 1.2rem; align-items: center; margin: .6rem 0; }
.controls input[type=number] { width: 5rem; }
.controls input[type=search] { width: 12rem; }
table { border-collapse: collapse; }
th, td { padding: 2px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: middle; }
table.index th { position: sticky; top: 0; background: #fff; cursor: pointer; user-select: none; white-space: nowrap; }
table.index th.sorted.asc::after { content: " \25B2"; font-size: 10px; }
table.index th.sorted.desc::after { content: " \25BC"; font-size: 10px; }
table.index tbody tr:hover { background: #f6f8fa; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 1rem; margin: .4rem 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
.thumbs { display: flex; flex-wrap: wrap; gap: 6px; }
figure.thumb { margin: 0; width: 64px; font-size: 11px; }
.minis { white-space: nowrap; }
img.mini { width: 32px; height: 32px; object-fit: cover; margin-right: 2px; vertical-align: middle; background: #eee; }
figure.thumb img { display: block; width: 64px; height: 64px; object-fit: cover; image-rendering: pixelated; background: #eee; }
figure.thumb figcaption { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar { display: inline-block; height: 10px; background: var(--accent); vertical-align: middle; }
.dbar { position: relative; display: inline-block; width: 140px; height: 10px; background: #f1f5f9; vertical-align: middle; }
.dbar::before { content: ""; position: absolute; left: 50%; top: -2px; bottom: -2px; border-left: 1px solid #9ca3af; }
.dbar span { position: absolute; top: 0; bottom: 0; }
.pos { background: rgb(var(--pos)); }
.neg { background: rgb(var(--neg)); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(590px, 1fr)); gap: 0 1.5rem; }
.card { border-top: 1px solid var(--line); padding: .2rem 0 .6rem; }
tr.chosen td { font-weight: 600; background: #eef2ff; }
.pager { margin: .5rem 0 0; }
</style>
</head>
<body>
<header>
  <strong>Latent explorer</strong>
  <nav><a href="#latents" id="nav-latents">Latents</a><a href="#classes" id="nav-classes">Classes</a></nav>
  <p id="summary"></p>
</header>
<main id="main"><noscript>The explorer draws its pages with JavaScript; enable it to browse the latents.</noscript></main>
<script type="application/json" id="explorer-data">/*DATA*/</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("explorer-data").textContent);
const HEADS = D.heads, CLASSES = D.classes;
const LATENTS = new Map(D.latents.map(l => [l.id, l]));
const CLASS_BY_NAME = new Map(CLASSES.map(c => [c.name, c]));
const MAX_ATTR = D.latents.reduce((m, l) => Math.max(m, ...l.attr.map(Math.abs)), 1e-12);
const LATENT_FILTERS = {sort: "id", desc: false, text: "", purity: "", rate: "", set: "any"};
const state = {latents: {...LATENT_FILTERS}, classes: {sort: "id", desc: false}, query: ""};

// ---------------------------------------------------------------------------- helpers
function el(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid !== null && kid !== undefined && kid !== false) node.append(kid instanceof Node ? kid : String(kid));
  }
  return node;
}
const none = v => v === null || v === undefined;
const fmt = (v, d = 3) => none(v) ? "\u2013" : Number(v).toFixed(d);
const pct = (v, d = 1) => none(v) ? "\u2013" : (100 * v).toFixed(d) + "%";
const signed = (v, d = 3) => none(v) ? "\u2013" : (v >= 0 ? "+" : "") + Number(v).toFixed(d);
const interval = ci => none(ci) ? "" : `[${signed(ci[0])}, ${signed(ci[1])}]`;
const headList = hs => hs.length ? hs.map(h => HEADS[h]).join(", ") : "no head";
const shade = v => `background: rgba(${v >= 0 ? "var(--pos)" : "var(--neg)"}, ${(0.85 * Math.min(1, Math.abs(v) / MAX_ATTR)).toFixed(3)})`;

function latentLink(j, text) {
  const label = text === undefined ? `latent ${j}` : text;
  return LATENTS.has(j) ? el("a", {href: `#latent/${j}`}, label) : el("span", {class: "muted"}, label);
}
function classLink(c, text) {
  return c ? el("a", {href: `#class/${encodeURIComponent(c.name)}`}, text === undefined ? c.name : text) : "\u2013";
}
function facts(pairs) {
  return el("dl", {class: "facts"}, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}
function divergingBar(v, max) {
  const width = (50 * Math.min(1, Math.abs(v) / max)).toFixed(2);
  return el("span", {class: "dbar"}, el("span", {class: v >= 0 ? "pos" : "neg", style: `width: ${width}%; ${v >= 0 ? "left" : "right"}: 50%`}));
}
function thumbs(l) {
  const n = l.top.length;
  return el("div", {class: "thumbs"}, l.top.map(([row, label, act], i) => {
    const what = `${CLASSES[label].name}, activation ${fmt(act)} (training image ${row})`;
    return el("figure", {class: "thumb"},
      el("img", {class: "thumb-img", src: l.img, width: 64, height: 64, alt: what, title: what,
                 style: `object-position: ${n > 1 ? (100 * i / (n - 1)).toFixed(3) : 0}% 0`}),
      el("figcaption", {}, classLink(CLASSES[label])));
  }));
}
function pager(prev, up, next) {
  return el("p", {class: "pager"}, prev ? [prev, " \u00b7 "] : "", up, next ? [" \u00b7 ", next] : "");
}
function minis(l, n) {  // its first n thumbnails at their own size, loaded as they come near the window (`showLazy`)
  return el("span", {class: "minis"}, l.top.slice(0, n).map((_, i) => el("img", {class: "thumb-img mini", width: 32, height: 32, alt: "",
    style: `object-position: ${l.top.length > 1 ? (100 * i / (l.top.length - 1)).toFixed(3) : 0}% 0`, "data-src": l.img})));
}
const nearWindow = "IntersectionObserver" in window ? new IntersectionObserver(entries => {
  for (const e of entries.filter(e => e.isIntersecting)) { show(e.target); nearWindow.unobserve(e.target); }
}, {rootMargin: "1000px 0px"}) : null;
function show(img) { img.src = img.dataset.src; img.removeAttribute("data-src"); }
function showLazy(root) {  // (loading="lazy" loads them all here: the index would read every strip at once)
  for (const img of root.querySelectorAll("img[data-src]")) nearWindow ? nearWindow.observe(img) : show(img);
}
function missing(text) {
  return el("section", {"data-view": "missing"}, el("h1", {}, "Not here"), el("p", {}, text, " ", el("a", {href: "#latents"}, "Back to the latents.")));
}

// A table sorted by clicking its headers: columns {key, label, value(row), cell(row)?, num?, title?, style(row)?};
// a column without `value` only shows its `cell`.
function sortable(view, columns, rows, rowClass) {
  const st = state[view];
  const col = columns.find(c => c.key === st.sort && c.value) || columns[0];
  const sorted = rows.slice().sort((a, b) => {
    const x = col.value(a), y = col.value(b);
    if (none(x) || none(y)) return none(x) - none(y) || a.id - b.id;  // empty cells last either way
    const order = typeof x === "string" ? x.localeCompare(y) : x - y;
    return (st.desc ? -order : order) || a.id - b.id;
  });
  const table = el("table", {class: "index"});
  const redraw = () => { const next = sortable(view, columns, rows, rowClass); table.replaceWith(next); showLazy(next); };
  table.append(
    el("thead", {}, el("tr", {}, columns.map(c => el("th", {
      class: [c.num ? "num" : "", c.key === col.key ? `sorted ${st.desc ? "desc" : "asc"}` : ""].join(" ").trim() || null,
      title: c.title || (c.value ? "sort" : null), onclick: c.value && (() => {
        if (st.sort === c.key) st.desc = !st.desc; else { st.sort = c.key; st.desc = Boolean(c.num) && c.key !== "id"; }
        redraw();
      })}, c.label)))),
    el("tbody", {}, sorted.map(r => el("tr", {class: rowClass, "data-id": r.id}, columns.map(c =>
      el("td", {class: c.num ? "num" : null, style: c.style ? c.style(r) : null}, c.cell ? c.cell(r) : c.value(r)))))));
  return table;
}

// ---------------------------------------------------------------------------- latents
function inSetsText(l) {
  const parts = l.sets.map(([c]) => CLASSES[c].name);
  if (l.global !== null) parts.unshift("global");
  return parts.length > 3 ? `${parts.slice(0, 3).join(", ")} +${parts.length - 3}` : parts.join(", ");
}
function latentMatches(l, st) {
  const text = st.text.trim().toLowerCase();
  if (text && String(l.id) !== text && !l.label.toLowerCase().includes(text)) return false;
  if (st.purity !== "" && !(l.purity >= Number(st.purity))) return false;
  if (st.rate !== "" && !(100 * l.rate >= Number(st.rate))) return false;
  if (st.set === "global") return l.global !== null;
  if (st.set === "class") return l.sets.length > 0;
  if (st.set === "none") return l.global === null && !l.sets.length;
  if (st.set.startsWith("c")) return l.sets.some(([c]) => c === Number(st.set.slice(1)));
  return true;
}
function latentsView(query) {
  const st = state.latents;
  if (query !== state.query) {  // #latents?purity=0.9&set=c3&sort=purity&desc=1: a link sets every filter, once
    const q = new URLSearchParams(query);
    Object.assign(st, LATENT_FILTERS);
    for (const key of ["text", "purity", "rate", "set", "sort"]) if (q.has(key)) st[key] = q.get(key);
    st.desc = q.get("desc") === "1";
    state.query = query;
  }
  const columns = [
    {key: "id", label: "latent", value: l => l.id, cell: l => latentLink(l.id, String(l.id)), num: true},
    {key: "label", label: "label", value: l => l.label, cell: l => classLink(CLASS_BY_NAME.get(l.label)),
     title: "the class that holds most of its activation mass on the training images"},
    {key: "purity", label: "purity", value: l => l.purity, cell: l => fmt(l.purity, 2), num: true,
     title: "the label's share of its activation mass"},
    {key: "top", label: "top images", cell: l => minis(l, 3), title: "its most activating training images"},
    {key: "rate", label: "fires on", value: l => l.rate, cell: l => pct(l.rate, l.rate < 0.01 ? 2 : 1), num: true,
     title: "share of the training images it fires on"},
    {key: "act", label: "mean act.", value: l => l.act, cell: l => fmt(l.act), num: true, title: "mean value where it fires"},
    {key: "sets", label: "top sets", value: l => l.sets.length + (l.global !== null ? 0.5 : 0), cell: inSetsText,
     title: "the global set and the classes' sets it belongs to"},
    ...HEADS.map((h, i) => ({key: `h${i}`, label: h, value: l => l.attr[i], cell: l => signed(l.attr[i]), num: true, style: l => shade(l.attr[i]),
      title: `gate-logit change of ${h} per unit activation (green keeps the head, red drops it)`})),
  ];
  const count = el("p", {id: "latent-count", class: "muted"});
  const box = el("div");
  const draw = () => {
    const rows = D.latents.filter(l => latentMatches(l, st));
    count.textContent = `${rows.length} of ${D.latents.length} alive latents. Click a column to sort; a latent for its page.`;
    box.replaceChildren(sortable("latents", columns, rows, "latent-row"));
    showLazy(box);
  };
  const input = (key, attrs) => el("input", {...attrs, value: st[key], oninput: e => { st[key] = e.target.value; draw(); }});
  const select = el("select", {onchange: e => { st.set = e.target.value; draw(); }},
    [["any", "any or none"], ["global", "the global set"], ["class", "some class's set"], ["none", "no set"],
     ...CLASSES.map(c => [`c${c.id}`, `${c.name}'s set`])].map(([v, text]) => el("option", {value: v, selected: v === st.set}, text)));
  const view = el("section", {"data-view": "latents"},
    el("div", {class: "controls"},
      el("label", {}, "label or id ", input("text", {type: "search", placeholder: "e.g. bowl or 12", id: "filter-text"})),
      el("label", {}, "purity \u2265 ", input("purity", {type: "number", min: 0, max: 1, step: 0.05, id: "filter-purity"})),
      el("label", {}, "fires on \u2265 ", input("rate", {type: "number", min: 0, max: 100, step: 1, id: "filter-rate"}), " %"),
      el("label", {}, "in top set ", select)),
    count, box);
  draw();
  return view;
}

function latentView(j) {
  const l = LATENTS.get(j);
  if (!l) return missing(j < D.n_latents ? `Latent ${j} never fires on a training image.` : `This SAE has latents 0 to ${D.n_latents - 1}.`);
  const at = D.latents.indexOf(l), prev = D.latents[at - 1], next = D.latents[at + 1];
  const label = CLASS_BY_NAME.get(l.label);
  const more = l.fires_in - l.mass.length;
  return el("article", {"data-view": "latent", id: "latent-panel"},
    pager(prev && latentLink(prev.id, `\u2190 latent ${prev.id}`), el("a", {href: "#latents"}, "all latents"),
          next && latentLink(next.id, `latent ${next.id} \u2192`)),
    el("h1", {}, `Latent ${l.id}`, el("span", {class: "chip"}, l.label)),
    facts([
      ["label", classLink(label)],
      ["purity", `${fmt(l.purity, 3)} (the label's share of its activation mass)`],
      ["fires on", `${pct(l.rate, 2)} of the training images, in ${l.fires_in} of ${CLASSES.length} classes`],
      ["mean activation", `${fmt(l.act)} where it fires`],
      ["pushes hardest", `${l.pushes} (at its mean activation)`],
    ]),
    el("h2", {}, `Its ${l.top.length} most activating training images`),
    thumbs(l),
    el("h2", {}, "Activation mass by class (training images)"),
    el("table", {id: "class-mass"}, el("thead", {}, el("tr", {}, el("th", {}, "class"), el("th", {colspan: 2}, "share of its mass"),
                                                            el("th", {class: "num"}, "fires on the class's images"))),
       el("tbody", {}, l.mass.map(([c, share, rate]) => el("tr", {},
         el("td", {}, classLink(CLASSES[c])), el("td", {}, el("span", {class: "bar", style: `width: ${(160 * share).toFixed(1)}px`})),
         el("td", {class: "num"}, pct(share)), el("td", {class: "num"}, pct(rate)))))),
    more > 0 ? el("p", {class: "muted"}, `and ${more} more classes`) : "",
    el("h2", {}, "Its pull on the final block's heads"),
    el("p", {class: "help"}, "The change of each head's gate logit per unit of this latent's activation (its decoder direction through the ",
       "final block's decision network): positive keeps the head, negative drops it."),
    el("table", {id: "head-attribution"},
      el("thead", {}, el("tr", {}, el("th", {}, "head"), el("th", {class: "num"}, "per unit"), el("th", {class: "num"}, "at its mean activation"), el("th", {}))),
      el("tbody", {}, HEADS.map((h, i) => el("tr", {}, el("td", {}, h), el("td", {class: "num"}, signed(l.attr[i])),
        el("td", {class: "num"}, signed(l.attr[i] * l.act)), el("td", {}, divergingBar(l.attr[i], MAX_ATTR)))))),
    el("h2", {}, "The top sets it is in"),
    el("p", {}, l.global !== null ? `The global set (the ${D.top_k} latents that fire most often): rank ${l.global + 1}; the global strategy amplifies it for every image.`
                                  : "Not in the global set."),
    l.sets.length
      ? el("p", {}, "The sets of ", l.sets.map(([c, rank], i) => [i ? ", " : "", classLink(CLASSES[c]), ` (rank ${rank + 1})`]),
           ": per-class steering amplifies it on those classes' images.")
      : el("p", {}, "No class's set: per-class steering never amplifies it."));
}

// ---------------------------------------------------------------------------- classes
function share(c) {
  return c.steer && c.ceiling && c.ceiling.use - c.ceiling.use0 < 0 ? (c.steer.use - c.steer.use0) / (c.ceiling.use - c.ceiling.use0) : null;
}
function classesView() {
  const columns = [
    {key: "id", label: "class", value: c => c.name, cell: c => classLink(c)},
    {key: "set", label: "set size", value: c => c.set.length, num: true},
    {key: "alpha", label: "\u03b1", value: c => c.steer && c.steer.alpha, cell: c => c.steer ? signed(c.steer.alpha, 2) : "\u2013", num: true,
     title: `per-class steering: the alpha chosen on ${D.settings.select_on}`},
    {key: "use", label: "usage change", value: c => c.steer && c.steer.use - c.steer.use0, cell: c => c.steer ? signed(c.steer.use - c.steer.use0) : "\u2013",
     num: true, title: "final-block head usage, steered minus unsteered (test)"},
    {key: "acc", label: "accuracy change", value: c => c.steer && c.steer.acc - c.steer.acc0, cell: c => c.steer ? signed(c.steer.acc - c.steer.acc0) : "\u2013",
     num: true, title: "test accuracy, steered minus unsteered"},
    {key: "ceiling", label: "ceiling usage change", value: c => c.ceiling && c.ceiling.use - c.ceiling.use0,
     cell: c => c.ceiling ? signed(c.ceiling.use - c.ceiling.use0) : "\u2013", num: true, title: "the best fixed final-block pattern under the same rule (test)"},
    {key: "share", label: "share of ceiling", value: share, cell: c => pct(share(c), 0), num: true},
    {key: "pattern", label: "ceiling's heads", value: c => c.ceiling && c.ceiling.pattern !== null ? headList(c.ceiling.heads) : null,
     title: "the heads the ceiling's pattern keeps (\u2013: the model's own gates)"},
  ];
  return el("section", {"data-view": "classes"},
    el("p", {class: "muted"}, `${CLASSES.length} classes. Per-class steering chooses each class's alpha on the ${D.settings.select_on} split `,
       "and is reported on test; the ceiling is the best fixed final-block pattern under the same rule."),
    sortable("classes", columns, CLASSES, "class-row"));
}

function steering(c) {
  const s = c.steer;
  if (!s) return el("p", {}, "No per-class steering headline (per_class was not among the strategies).");
  const beyond = {"-1": "below the interval of random class-sized sets at the same alpha", "0": "inside the interval of random class-sized sets at the same alpha",
                  "1": "above the interval of random class-sized sets at the same alpha"}[String(s.beyond_null)];
  return [
    el("p", {}, `Amplifying its top set (mode ${D.settings.mode}) with alpha ${signed(s.alpha, 2)}, chosen on the ${D.settings.select_on} split `,
       `(the least final-block usage at an accuracy no lower than unsteered${D.settings.accuracy_tolerance ? ` minus ${D.settings.accuracy_tolerance}` : ""}); on test:`),
    el("table", {id: "steering"},
      el("thead", {}, el("tr", {}, el("th", {}), el("th", {class: "num"}, "unsteered"), el("th", {class: "num"}, "steered"),
                         el("th", {class: "num"}, "change"), el("th", {}, "interval"))),
      el("tbody", {},
        el("tr", {}, el("td", {}, "accuracy"), el("td", {class: "num"}, pct(s.acc0)), el("td", {class: "num"}, pct(s.acc)),
           el("td", {class: "num"}, signed(s.acc - s.acc0)), el("td", {}, interval(s.acc_ci))),
        el("tr", {}, el("td", {}, "final-block usage"), el("td", {class: "num"}, fmt(s.use0)), el("td", {class: "num"}, fmt(s.use)),
           el("td", {class: "num"}, signed(s.use - s.use0)), el("td", {}, interval(s.use_ci))),
        el("tr", {}, el("td", {}, "heads most images keep"), el("td", {class: "num"}, headList(s.heads0)), el("td", {class: "num"}, headList(s.heads)),
           el("td", {}), el("td", {})))),
    beyond ? el("p", {class: "muted"}, `The usage change lies ${beyond}.`) : "",
  ];
}
function ceilingText(c) {
  const k = c.ceiling;
  if (!k) return el("p", {}, "No ceiling for this class.");
  if (k.pattern === null) return el("p", {}, "No fixed final-block pattern beats the model's own gates under the rule: the ceiling keeps them (usage change 0).");
  const part = share(c);
  return el("p", {}, `The best fixed final-block pattern keeps ${headList(k.heads)}: usage ${fmt(k.use0)} \u2192 ${fmt(k.use)}, `,
            `accuracy ${pct(k.acc0)} \u2192 ${pct(k.acc)} on test.`, part === null ? "" : ` Per-class steering reaches ${pct(part, 0)} of its usage change.`);
}
function classView(name) {
  const c = CLASS_BY_NAME.get(name);
  if (!c) return missing(`There is no class "${name}" in this run.`);
  const prev = CLASSES[c.id - 1], next = CLASSES[c.id + 1];
  const chosen = c.steer ? c.steer.alpha : null;
  return el("article", {"data-view": "class", id: "class-panel"},
    pager(prev && classLink(prev, `\u2190 ${prev.name}`), el("a", {href: "#classes"}, "all classes"), next && classLink(next, `${next.name} \u2192`)),
    el("h1", {}, c.name),
    el("h2", {}, "Steering outcome"), steering(c),
    el("h2", {}, "The ceiling"), ceilingText(c),
    el("h2", {}, `Its top set: ${c.set.length} latents, most frequent first`),
    el("p", {}, el("a", {href: `#latents?set=c${c.id}&sort=purity&desc=1`}, "These latents in the index"), "; their most activating training images:"),
    el("div", {class: "cards"}, c.set.map(j => {
      const l = LATENTS.get(j);
      return el("section", {class: "card"},
        el("h3", {}, latentLink(j), l ? [` '${l.label}', purity ${fmt(l.purity, 2)}, fires on ${pct(l.rate)}; pushes ${l.pushes}`] : ""),
        l ? thumbs(l) : "");
    })),
    el("h2", {}, "Classes that share its latents"),
    c.related.length ? el("p", {}, c.related.map(([r, overlap], i) => [i ? ", " : "", classLink(CLASSES[r]), ` (overlap ${fmt(overlap, 2)})`]))
                     : el("p", {class: "muted"}, "none"),
    c.curve.length ? [
      el("h2", {}, "Per-class steering over alpha (test split)"),
      el("table", {id: "curve"}, el("thead", {}, el("tr", {}, el("th", {class: "num"}, "alpha"), el("th", {class: "num"}, "accuracy"), el("th", {class: "num"}, "usage"))),
        el("tbody", {}, c.curve.map(([a, acc, use]) => el("tr", {class: a === chosen ? "chosen" : null},
          el("td", {class: "num"}, signed(a, 2)), el("td", {class: "num"}, pct(acc)), el("td", {class: "num"}, fmt(use)))))),
    ] : "",
    c.shift ? [
      el("h2", {}, "Predicted gate-logit shift per unit alpha"),
      el("p", {class: "help"}, `Mean over its test images, its own set, mode ${D.settings.mode} (what interpret predicts before any sweep).`),
      el("table", {id: "shift"}, el("tbody", {}, HEADS.map((h, i) => el("tr", {}, el("td", {}, h), el("td", {class: "num"}, signed(c.shift[i])),
        el("td", {}, divergingBar(c.shift[i], Math.max(1e-12, ...c.shift.map(Math.abs))))))))
    ] : "");
}

// ---------------------------------------------------------------------------- routing
function route() {
  const [hash, query = ""] = location.hash.slice(1).split("?", 2), slash = hash.indexOf("/");
  const view = slash < 0 ? hash : hash.slice(0, slash), arg = slash < 0 ? "" : decodeURIComponent(hash.slice(slash + 1));
  let node;
  if (view === "latent") node = /^\d+$/.test(arg) ? latentView(Number(arg)) : missing(`"${arg}" is not a latent id.`);
  else if (view === "class") node = classView(arg);
  else if (view === "classes") node = classesView();
  else node = latentsView(query);
  document.getElementById("main").replaceChildren(node);
  showLazy(node);
  document.body.dataset.view = node.dataset.view;
  for (const [id, views] of [["nav-latents", ["latents", "latent"]], ["nav-classes", ["classes", "class"]]]) {
    document.getElementById(id).className = views.includes(node.dataset.view) ? "active" : "";
  }
  const h1 = node.querySelector("h1");
  document.title = (h1 && node.dataset.view !== "missing" ? h1.firstChild.textContent + " \u2013 " : "") + "Latent explorer";
  window.scrollTo(0, 0);
}
document.getElementById("summary").textContent =
  `${D.latents.length} alive latents of ${D.n_latents} (${D.n_latents - D.latents.length} never fire on a training image) \u00b7 ` +
  `${CLASSES.length} classes, top sets of ${D.top_k} \u00b7 the final block's ${HEADS.length} heads`;
window.addEventListener("hashchange", route);
window.addEventListener("load", () => {
  const images = [...document.querySelectorAll("img.thumb-img")];
  document.body.dataset.images = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.loadMs = Math.round(performance.now());
});
route();
</script>
</body>
</html>
"""
