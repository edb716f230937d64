"""The audit report: static HTML that opens from disk (inline CSS, relative links, no script, no network),
a markdown summary and a PNG of the category shares."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from saealign._io import atomic_path, write_json
from saealign.audit.audit import AUDIT_CATEGORIES

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}.ctx{font-family:monospace;white-space:pre-wrap;background:#fafafa;padding:4px;margin:3px 0}
mark{background:#ffd54f;font-weight:bold}.tok{color:#555}.bar{background:#4a90d9;height:12px;display:inline-block}
.num{text-align:right;font-variant-numeric:tabular-nums}"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>\n")


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _visible(piece: str) -> str:
    return escape(piece.replace("\n", "⏎"))


def _context(ctx: dict[str, Any]) -> str:
    parts = [f"<mark>{_visible(t)}</mark>" if i == ctx["marked"] else _visible(t) for i, t in enumerate(ctx["tokens"])]
    return f"<div class='ctx'>[{ctx['value']:.3g}] {''.join(parts)}</div>"


def _shares_table(shares: dict[str, dict[str, float]]) -> str:
    rows = "".join(f"<tr><td>{escape(c)}</td><td class='num'>{100 * s['share']:.1f} %</td>"
                   f"<td class='num'>{100 * s['low']:.1f} – {100 * s['high']:.1f} %</td>"
                   f"<td><span class='bar' style='width:{int(300 * s['share'])}px'></span></td></tr>"
                   for c, s in shares.items())
    return f"<table><tr><th>category</th><th>share of edit mass</th><th>95 % bootstrap interval</th><th></th></tr>{rows}</table>"


def _latent_page(row: dict[str, Any], description: dict[str, Any] | None, prompts: list[dict]) -> str:
    body = [f"<p><a href='../index.html'>← index</a></p><p>category <b>{escape(row['category'])}</b>; selected in "
            f"S- {row['selected_minus']} and S+ {row['selected_plus']} times; edited on {row['edited_tokens']} generated "
            f"tokens; edit mass {row['edit_mass']:.3f}</p>"]
    body.append("<h2>Tokens it was edited on</h2><p>"
                + ", ".join(f"<code>{_visible(p)}</code> ×{n}" for p, n in row["pieces"]) + "</p>")
    if description:
        q = description["quantiles"]
        body.append(f"<h2>Description (corpus)</h2><p>density {100 * description['density']:.3f} % of tokens; "
                    f"activation q50 {q['q50'] or 0:.3g}, q90 {q['q90'] or 0:.3g}, q99 {q['q99'] or 0:.3g}, "
                    f"max {q['max']:.3g}</p>")
        classes = sorted(description["token_classes"].items(), key=lambda kv: -kv[1])
        body.append("<p>token classes (activation-weighted): "
                    + ", ".join(f"{escape(c)} {100 * v:.0f} %" for c, v in classes) + "</p>")
        lens = description["logit_lens"]
        for side in ("promoted", "suppressed"):
            body.append(f"<p>logit lens, {side}: " + " ".join(f"<code>{_visible(t)}</code>" for t, _ in lens[side]) + "</p>")
        body.append("<h2>Top-activating contexts</h2>" + "".join(_context(c) for c in description["contexts"]))
    else:
        body.append("<p>(no description: run <code>saealign sae describe</code> and pass --descriptions)</p>")
    chosen = sorted(set(row["prompts"]))
    body.append(f"<h2>Prompts for which DSPA selected it ({len(chosen)})</h2><table><tr><th>#</th><th>kind</th><th>prompt</th>"
                "<th>edits here</th></tr>" + "".join(
                    f"<tr><td>{i}</td><td>{escape(prompts[i]['kind'] or '')}</td><td>{escape(prompts[i]['prompt'][:300])}</td>"
                    f"<td class='num'>{prompts[i]['edits'].get(str(row['latent']), {}).get('tokens', 0)}</td></tr>"
                    for i in chosen) + "</table>")
    return _page(f"Latent {row['latent']}", "".join(body))


def _index(result: dict[str, Any]) -> str:
    s = result["settings"]
    body = [f"<p>{len(result['prompts'])} prompts; DSPA mode {escape(str(s['mode']))}, alpha {s['alpha']}, k_prompt "
            f"{s['k_prompt']}, k_diff {s['k_diff']}, {s['max_new_tokens']} new tokens (greedy); "
            f"{result['edited_tokens']} of {result['generated_tokens']} generated tokens edited.</p>",
            "<h2>Share of edit mass by latent category</h2>", _shares_table(result["category_shares"])]
    if result["separating"]:
        a, b = result["kinds"][:2]
        body.append(f"<h2>Latents that separate {escape(a)} from {escape(b)} prompts</h2><table><tr><th>latent</th>"
                    f"<th>selected, {escape(a)}</th><th>selected, {escape(b)}</th><th>difference</th></tr>" + "".join(
                        f"<tr><td><a href='latents/latent_{r['latent']}.html'>{r['latent']}</a></td>"
                        f"<td class='num'>{100 * r[f'rate_{a}']:.0f} %</td><td class='num'>{100 * r[f'rate_{b}']:.0f} %</td>"
                        f"<td class='num'>{100 * r['difference']:+.0f} %</td></tr>" for r in result["separating"]) + "</table>")
    body.append("<h2>Latents by edit mass</h2><table><tr><th>latent</th><th>category</th><th>edit mass</th><th>edited tokens</th>"
                "<th>selected S- / S+</th><th>edited on</th></tr>" + "".join(
                    f"<tr><td><a href='latents/latent_{r['latent']}.html'>{r['latent']}</a></td><td>{escape(r['category'])}</td>"
                    f"<td class='num'>{r['edit_mass']:.3f}</td><td class='num'>{r['edited_tokens']}</td>"
                    f"<td class='num'>{r['selected_minus']} / {r['selected_plus']}</td>"
                    f"<td>{' '.join(f'<code>{_visible(p)}</code>' for p, _ in r['pieces'][:6])}</td></tr>"
                    for r in result["latents"]) + "</table>")
    return _page("DSPA feature audit", "".join(body))


def markdown_summary(result: dict[str, Any], top: int = 15) -> str:
    """Category shares, the top latents by edit mass, and every prompt's selected sets."""
    lines = ["# DSPA feature audit", "", f"{len(result['prompts'])} prompts, {result['edited_tokens']} of "
             f"{result['generated_tokens']} generated tokens edited; settings {result['settings']}.", "",
             "| category | share of edit mass | 95 % bootstrap interval |", "|---|---|---|"]
    lines += [f"| {c} | {100 * s['share']:.1f} % | {100 * s['low']:.1f} – {100 * s['high']:.1f} % |"
              for c, s in result["category_shares"].items()]
    lines += ["", "| latent | category | edit mass | edited tokens | selected S- / S+ | edited on |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['latent']} | {r['category']} | {r['edit_mass']:.3f} | {r['edited_tokens']} | "
              f"{r['selected_minus']} / {r['selected_plus']} | {' '.join(repr(p) for p, _ in r['pieces'][:5])} |"
              for r in result["latents"][:top]]
    lines += ["", "| # | kind | prompt | S- | S+ | edited tokens |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r['kind'] or ''} | {r['prompt'][:80].replace('|', '/').replace(chr(10), ' ')} | "
              f"{' '.join(map(str, r['minus']))} | {' '.join(map(str, r['plus']))} | {r['edited_tokens']} |"
              for i, r in enumerate(result["prompts"])]
    return "\n".join(lines) + "\n"


def _plot_shares(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = result["category_shares"]
    values = [100 * shares[c]["share"] for c in AUDIT_CATEGORIES]
    errors = [[100 * (shares[c]["share"] - shares[c]["low"]) for c in AUDIT_CATEGORIES],
              [100 * (shares[c]["high"] - shares[c]["share"]) for c in AUDIT_CATEGORIES]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(AUDIT_CATEGORIES, values, yerr=errors, capsize=4, color="#4a90d9")
    ax.set(ylabel="% of edit mass", title=f"DSPA edits by latent category ({len(result['prompts'])} prompts, 95 % CI)")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def write_report(result: dict[str, Any], descriptions: dict[str, Any] | None, out: str | Path) -> Path:
    """audit.json, report.md, category_shares.png, index.html and latents/latent_J.html under `out`."""
    out = Path(out)
    write_json(out / "audit.json", result)
    _write(out / "report.md", markdown_summary(result))
    _plot_shares(result, out / "category_shares.png")
    described = (descriptions or {}).get("latents", {})
    for row in result["latents"]:
        _write(out / "latents" / f"latent_{row['latent']}.html",
               _latent_page(row, described.get(str(row["latent"])), result["prompts"]))
    _write(out / "index.html", _index(result))
    return out / "index.html"
