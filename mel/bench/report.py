"""Markdown tables and PNG plots of the bench results, rendered from their JSON alone."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..evaluate import HITS_AT as HITS
from .provenance import save_json


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:,.1f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def markdown_quality(res: dict) -> str:
    lines = [f"# Quality and speed on the dev splits ({res.get('preset')} preset)", "",
             f"Command: `{res['command']}` (commit {res.get('git_commit')}, seed {res['seed']}, "
             f"{res['machine']['cpus']} CPUs, torch threads {res['machine']['torch_threads']}, load average at "
             f"start {res['machine']['load_average_at_start']}). Protocol: {res['protocol']}.", ""]
    for fmt, d in res["datasets"].items():
        lines.append(f"- **{fmt}**: KB {d['kb']} {d['kb_size']:,} entities (sha256 {d['kb_checksum']['sha256'][:12]}), "
                     f"data sha256 {d['data_checksum']['sha256'][:12]}, {d['n_dev_examples']:,} dev mentions, "
                     f"{d['n_with_image']} with an image; generative linkers on the first {d['generative_subset']:,}.")
    lines += ["", "| dataset | linker | n | H@1 | H@5 | H@10 | H@20 | MRR | with image | p50 ms | p95 ms | mentions/s | peak RSS MB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['dataset']} | {r['linker']} | {r['n']:,} | " + " | ".join(_fmt(r[f'hits@{h}']) for h in HITS) +
                     f" | {_fmt(r['mrr'])} | {r['n_with_image']} | {_fmt(r['latency_ms_p50'], 1)} | "
                     f"{_fmt(r['latency_ms_p95'], 1)} | {_fmt(r['throughput_per_s'], 1)} | {_fmt(r['peak_rss_mb'], 1)} |")
    lines += ["", "Same mentions for every linker (the generative subset of each split):", "",
              "| dataset | linker | n | H@1 | H@5 | MRR |", "|---|---|---:|---:|---:|---:|"]
    for r in res["subset_rows"]:
        lines.append(f"| {r['dataset']} | {r['linker']} | {r['n']:,} | {_fmt(r['hits@1'])} | {_fmt(r['hits@5'])} | "
                     f"{_fmt(r['mrr'])} |")
    return "\n".join(lines) + "\n"


def markdown_reference(res: dict) -> str:
    lines = ["# Physical reference: achieved fraction of what this machine does on the same work", "",
             f"Command: `{res['command']}` (commit {res.get('git_commit')}, {res['machine']['cpus']} CPUs, torch threads "
             f"{res['machine']['torch_threads']}, load average at start {res['machine']['load_average_at_start']}); "
             f"KB {res['kb']} {res['kb_size']:,} entities.", ""]
    m, llm = res["machine_reference"], res["llm"]
    lines += ["| stage | achieved | the machine on the same work | fraction |", "|---|---:|---:|---:|"]
    if "dense_search" in res:
        d = res["dense_search"]
        lines.append(f"| dense top-20 search, {d['rows']:,} x {d['dim']} ({d['engine']}) | {d['search_ms_p50']} ms | bare "
                     f"(1, d) x (d, n) product {d['bare_matmul_ms_p50']} ms | {d['fraction_of_bare_matmul']} |")
        lines.append(f"| ... bytes read per second | {d['achieved_gb_per_s']} GB/s | memory copy {m['copy_gb_per_s']} GB/s | "
                     f"{d['fraction_of_copy_bandwidth']} |")
    lines.append(f"| GEMEL prompt prefill, {llm['prompt_tokens_mean']} tokens | {llm['gemel_prefill_tokens_per_s']} tokens/s | "
                 f"plain forward, same model and shape {llm['plain_forward_tokens_per_s']} tokens/s | "
                 f"{llm['prefill_fraction_of_plain_forward']} |")
    lines.append(f"| GEMEL constrained decoding | {llm['gemel_decode_tokens_per_s']} tokens/s | plain cached step of "
                 f"{llm['beams']} beams {llm['plain_decode_step_tokens_per_s']} tokens/s | {llm['decode_fraction_of_plain_step']} |")
    lines.append(f"| plain forward, FLOP rate | {llm['plain_forward_gflops']} GFLOP/s | float32 matrix multiply "
                 f"{m['sgemm_gflops']} GFLOP/s | {llm['plain_forward_fraction_of_sgemm']} |")
    lines += ["", f"LLM {llm['model']} ({llm['parameters']:,} parameters); over {llm['n_links']} GEMEL links the LLM "
              f"took {llm['llm_share_of_link_time']} of the link time. A fraction above 1 means the work ran faster "
              f"than the reference (e.g. a KB index small enough to stay in cache reads faster than a 64 MB copy)."]
    return "\n".join(lines) + "\n"


def markdown_ablations(res: dict) -> str:
    if not res["rows"]:  # --photos-only
        lines = [f"# Ablations on every photo ({res.get('preset')} preset)", "",
                 f"Command: `{res['command']}` (commit {res.get('git_commit')}, seed {res['seed']})."]
        return _markdown_photos(res, lines)
    lines = [f"# Ablations on {res['dataset']} dev ({res.get('preset')} preset)", "",
             f"Command: `{res['command']}` (commit {res.get('git_commit')}, seed {res['seed']}). KB {res['kb']} "
             f"{res['kb_size']:,} entities. DIM rows: all {res['n_dev_examples']:,} dev mentions ({res['n_with_image']} "
             f"with an image); GEMEL rows: the first {res['generative_subset']:,} ({res['n_with_image_in_subset']} with an "
             f"image).", "", "| question | variant | linker | n | H@1 | H@5 | MRR | p50 ms |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['question']} | {r['variant']} | `{r['linker']}` | {r['n']:,} | {_fmt(r['hits@1'])} | "
                     f"{_fmt(r['hits@5'])} | {_fmt(r['mrr'])} | {_fmt(r['latency_ms_p50'], 1)} |")
    return _markdown_photos(res, lines)


def _markdown_photos(res: dict, lines: list[str]) -> str:
    for photo_set in res.get("photos", {}).get("sets", []):
        lines += ["", f"## Photos: {photo_set['set']} (n = {photo_set['n']}, KB {photo_set['kb']} "
                      f"{photo_set['kb_size']:,} entities)", "", photo_set["note"] + ".", "",
                  "| variant | linker | H@1 | MRR | gold rank changed vs the linker's first row |",
                  "|---|---|---:|---:|---:|"]
        lines += [f"| {r['variant']} | `{r['linker']}` | {_fmt(r['hits@1'])} | {_fmt(r['mrr'])} | "
                  f"{r['gold_rank_changed']} |" for r in photo_set["rows"]]
    return "\n".join(lines) + "\n"


def markdown_scale(res: dict) -> str:
    lines = ["# Scale: KB build and search cost as the KB grows", "", f"Command: `{res['command']}` "
             f"(commit {res.get('git_commit')}). {res['note']}.", "",
             "| entities | KB build s | build ent/s | KB bytes/entity | BM25 p50 ms | engine | index build s | search p50 ms | "
             "batched ms/query | recall@20 | index bytes/entity | x vs numpy |",
             "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        for s in r["search"]:
            lines.append(f"| {r['entities']:,} | {r['kb_build_s']} | {r['kb_build_entities_per_s']:,} | "
                         f"{r['kb_bytes_per_entity']:,} | {r['bm25_ms_p50']} | {s['engine']} | {s['build_s']} | {s['query_ms_p50']} | "
                         f"{s['batched_ms_per_query']} | {s['recall@20_vs_exact']} | {s['index_bytes_per_entity']:,} | "
                         f"{s['speedup_vs_numpy']} |")
    if "encoder" in res:
        e = res["encoder"]
        lines += ["", f"Text encoder {e['model']} ({e['preset']} preset): {e['entities_per_s']} names/s on "
                      f"{e['names']:,} names."]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_quality(res: dict, out: Path) -> list[Path]:
    plt = _plt()
    paths = []
    datasets = list(res["datasets"])
    linkers = list(dict.fromkeys(r["linker"] for r in res["subset_rows"]))
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(len(linkers), 1)
    for j, spec in enumerate(linkers):
        vals = [next((r["hits@1"] for r in res["subset_rows"] if r["dataset"] == d and r["linker"] == spec), 0)
                for d in datasets]
        ax.bar(np.arange(len(datasets)) + j * width, vals, width, label=spec)
    ax.set_xticks(np.arange(len(datasets)) + width * (len(linkers) - 1) / 2)
    ax.set_xticklabels([f"{d}\n(first {res['datasets'][d]['generative_subset']:,} dev)" for d in datasets])
    ax.set_ylabel("Hits@1")
    ax.set_ylim(0, 1)
    ax.set_title(f"Hits@1 per linker, same mentions for every linker ({res.get('preset')} preset)")
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    paths.append(out / "quality.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rows = [r for r in res["rows"] if r["dataset"] == datasets[0]]
    stages = [s for s in dict.fromkeys(s for r in rows for s in r["stage_ms_mean"]) if s != "total"]
    colors = plt.get_cmap("tab20").colors
    names = [r["linker"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    a1.barh(names, [r["stage_ms_mean"].get("total", 0.0) for r in rows], color="tab:gray")
    a1.set_xscale("log")
    a1.set_xlabel("mean ms per mention (log)")
    a1.set_title(f"Latency on {datasets[0]} dev")
    left = np.zeros(len(rows))
    for i, s in enumerate(stages):  # each linker's time split by stage, as shares (linear)
        totals = np.array([max(r["stage_ms_mean"].get("total", 0.0), 1e-9) for r in rows])
        share = np.array([r["stage_ms_mean"].get(s, 0.0) for r in rows]) / totals
        a2.barh(names, share, left=left, label=s, color=colors[i % len(colors)])
        left += share
    a2.set_xlim(0, 1)
    a2.set_yticklabels([])
    a2.set_xlabel("share of the time per stage")
    a2.set_title("Where the time goes")
    a2.legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    paths.append(out / "latency_stages.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_ablations(res: dict, out: Path) -> list[Path]:
    if not res["rows"]:  # --photos-only: the photo sets are tables only
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [f"{r['variant']} (n={r['n']:,})" for r in res["rows"]]
    ax.barh(labels[::-1], [r["hits@1"] for r in res["rows"]][::-1], color="tab:blue")
    ax.set_xlim(0, 1)
    ax.set_xlabel("Hits@1")
    ax.set_title(f"Ablations on {res['dataset']} dev")
    fig.tight_layout()
    path = out / "ablations.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_scale(res: dict, out: Path) -> list[Path]:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [r["entities"] for r in res["rows"]]
    a1.plot(sizes, [r["kb_build_s"] for r in res["rows"]], "o-", label="KB build (s)")
    a1.plot(sizes, [r["bm25_ms_p50"] / 1000 for r in res["rows"]], "s-", label="BM25 query (s, p50)")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("entities")
    a1.set_title("KB build and BM25 search")
    a1.legend(fontsize=8)
    for engine in dict.fromkeys(s["engine"] for r in res["rows"] for s in r["search"]):
        pts = [(r["entities"], s["query_ms_p50"]) for r in res["rows"] for s in r["search"] if s["engine"] == engine]
        a2.plot(*zip(*pts, strict=True), "o-", label=engine)
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("entities")
    a2.set_ylabel("ms per query (p50)")
    a2.set_title(f"Dense top-20 search ({res['dim']} dims)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    path = out / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


RENDER = {"quality": (markdown_quality, plot_quality), "ablations": (markdown_ablations, plot_ablations),
          "scale": (markdown_scale, plot_scale), "reference": (markdown_reference, lambda res, out: [])}


def write_results(res: dict, out: Path) -> list[Path]:
    """bench_{kind}.json + .md + PNG plots under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    kind = res["kind"]
    paths = [out / f"bench_{kind}.json", out / f"bench_{kind}.md"]
    save_json(paths[0], res)
    markdown, plot = RENDER[kind]
    paths[1].write_text(markdown(res), encoding="utf-8")
    paths += plot(res, out)
    return paths
