"""`potluck bench-perf`'s report: the markdown section for docs/benchmarks.md and the PNG beside it."""

from __future__ import annotations

import statistics
from pathlib import Path

from node.bench.perf_results import PerfResult


# -- markdown ------------------------------------------------------------------------------------
def render_markdown(result: PerfResult, plot_name: str | None = None) -> str:
    s, m, local = result.settings, result.machine, result.local
    lines = [
        "## Performance: the swarm against transformers (issue 5)",
        "",
        f"- date: {result.date}",
        f"- machine: {m['cpu']}; {m['os']}; Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}; "
        f"load average {m['load']} at start",
        f"- command: `{s.command or 'potluck bench-perf --model ' + str(s.model)}`",
        f"- settings: model `{Path(s.model).name}` fp32, greedy, {s.prompt_tokens}-token seeded random prompt, "
        f"{s.new_tokens} new tokens (EOS suppressed), {m['threads']} torch threads here and per node, node processes "
        f"on loopback splitting the {result.num_layers} layers evenly; median of {s.repeats} run(s) after a warm-up; "
        "every ratio below is within this one run",
        *_weights_lines(result),
        "",
        "### 1. Decode",
        "",
        "The speed of this shared machine drifts by tens of percent over minutes, so every swarm run is paired "
        "with a transformers run just before it, and each ratio is against those paired runs (median over median).",
        "",
        "| system | decode tok/s | ms/token | transformers in the paired runs, tok/s | vs transformers (paired) | "
        "tokens equal transformers' |",
        "|---|---:|---:|---:|---:|---|",
        f"| {local.label} (alone, first) | {local.median:.2f} | {1000 / local.median:.1f} | | 1.00x | (reference) |",
    ]
    for speed in result.swarms:
        same = "yes" if speed.tokens == local.tokens else "**no**"
        lines.append(f"| {speed.label} | {speed.median:.2f} | {1000 / speed.median:.1f} | "
                     f"{statistics.median(speed.reference_tps):.2f} | {speed.ratio:.2f}x | {same} |")
    lines += ["", "Per-run decode tok/s (paired transformers run in brackets): " + "; ".join(
        f"{x.label} " + ", ".join(f"{v:.2f} ({r:.2f})" for v, r in zip(x.decode_tps, x.reference_tps))
        for x in result.swarms) + "."]
    if result.llama:
        lines += _llama_lines(result)
    if result.wan:
        wan_chain = ("" if s.wan_threads in (0, s.torch_threads) else
                     f" (a chain of its own with {s.wan_threads} torch thread(s) per node: with two, a node stalls "
                     "whenever a proxy or the client takes one of the two cores, which a real WAN does not do)")
        lines += [
            "",
            "### 2. Simulated WAN (latency proxy in front of every node)",
            "",
            f"The limit is 1 / (compute + trips x delay): compute is the push decode step of the same chain with no "
            f"proxies{wan_chain}; trips per token are hops + 1 with push and 2 x hops without. The proxies are "
            "processes on the same "
            "2 cores, and every byte takes an extra pass through one (read, timestamp, wait, write): the last "
            "column takes compute as measured through proxies that add no delay (same push mode, same chain, "
            "just before), so it isolates what the delay itself costs from what the simulation costs.",
            "",
            "| one-way delay per hop | push | decode tok/s | physical limit tok/s | share of the limit | "
            "limit with 0 ms proxies, tok/s | share of that limit |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for w in result.wan:
            lines.append(f"| {w.delay_ms:.0f} ms | {'yes' if w.push else 'no'} | {w.decode_tps:.2f} | "
                         f"{w.limit_tps:.2f} | {100 * w.share:.0f}% | {w.limit_proxied_tps:.2f} | "
                         f"{100 * w.share_proxied:.0f}% |")
    if result.concurrency:
        base, steady_base = result.concurrency[0][1], result.concurrency[0][3]
        lines += [
            "",
            "### 3. Concurrent sessions (3 nodes, push; one client thread per session, 1 torch thread each)",
            "",
            f"Each session generates {s.concurrency_tokens} tokens after a 16-token prompt; aggregate = all new "
            f"tokens / wall time (opening, prompts and decoding), median of {s.repeats} round(s) (each round "
            "runs every session count once, in turn). While all decode = the new tokens that came while every "
            "session was decoding (from the last session's first token to the first session's last), over "
            "that window: the decode speed of benchmark 1, for all sessions together. Steps per pass: how many "
            "sessions' steps the last node ran in one forward (continuous batching), on average over the "
            "rounds.",
            "",
            "| sessions | aggregate tok/s | vs 1 session | while all decode, tok/s | vs 1 session | "
            "steps per pass (last node) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for sessions, aggregate, per_pass, steady in result.concurrency:
            steady_cells = (f"{steady:.1f} | {steady / steady_base:.2f}x" if steady and steady_base
                            else "n/a (the sessions never all decoded at once) | n/a")
            lines.append(
                f"| {sessions} | {aggregate:.1f} | {aggregate / base:.2f}x | {steady_cells} | {per_pass:.2f} |"
            )
        if result.batched:
            lines += _batched_lines(result)
        if result.llama_batched:
            lines += _llama_batched_lines(result)
        if result.batch_compute:
            exact, dense = result.batch_compute
            lines += ["", f"What batching gives when only the computation takes time (node/bench/batch_compute.py, "
                          f"in this process, median of 30 alternating rounds): a node's pass over its share of the "
                          f"layers (1/{exact.nodes}) takes {exact.pass_one_ms:.2f} ms for one session's token and "
                          f"{exact.pass_many_ms:.2f} ms for {exact.rows} sessions' "
                          f"({exact.pass_many_ms / exact.pass_one_ms:.1f}x), the head {exact.head_one_ms:.2f} and "
                          f"{exact.head_many_ms:.2f} ms: {exact.rows} sessions would give **{exact.ratio:.2f}x** one "
                          f"session. With dense float32 weights (products bound by the bytes they read, not by "
                          f"arithmetic) the pass takes {dense.pass_one_ms:.2f} and {dense.pass_many_ms:.2f} ms, the "
                          f"head {dense.head_one_ms:.2f} and {dense.head_many_ms:.2f}: {dense.ratio:.2f}x. Time a "
                          f"round spends outside the computation once for all its sessions raises the measured ratio "
                          f"above these, time each session spends lowers it; the faster the chain, the closer it "
                          f"comes to them."]
        if result.concurrency_runs:
            lines += ["", "Aggregate tok/s of each round: " + "; ".join(
                f"{n} session{'s' if n > 1 else ''} " + ", ".join(f"{x:.1f}" for x in runs)
                for n, runs in result.concurrency_runs.items()) + "."]
        if result.settle_s:
            lines += ["", "Before each one-session round, one session ran alone until no node kept its weights packed "
                          "for several rows (after a round of many sessions a node unpacks them in its idle time, "
                          "which slows a lone session meanwhile; see performance.md): "
                          + ", ".join(f"{x:.1f}" for x in result.settle_s) + " s."]
        if result.concurrency_plain is not None:
            sessions, aggregate, per_pass, _ = result.concurrency_plain
            lines += ["", f"The sessions step as convoys (common/wire/convoy.py). A client without them "
                          f"(`ClientConfig(convoys=False)`), right after on the same nodes: {sessions} sessions "
                          f"{aggregate:.1f} tok/s in all ({aggregate / base:.2f}x one session), {per_pass:.2f} steps "
                          "per pass."]
    if result.prefill_swarm_s:
        lines += ["", "### 4. Prefill", "",
                  f"A {s.prefill_tokens}-token prompt, time to the first new token (median of {s.repeats}, the two "
                  "taking turns):", "",
                  "| system | seconds | vs one process |", "|---|---:|---:|",
                  f"| local transformers | {result.prefill_local_s:.2f} | 1.00x |",
                  f"| swarm, {max(s.node_counts)} nodes | {result.prefill_swarm_s:.2f} | "
                  f"{result.prefill_swarm_s / result.prefill_local_s:.2f}x |"]
    if result.rss_node_mb:
        a, b = result.node_span
        lines += ["", "### 5. Memory", "",
                  "| process | peak RSS MB | RSS at the end, MB |", "|---|---:|---:|",
                  f"| node serving layers {a}:{b} of {result.num_layers} (after every run above) | "
                  f"{result.rss_node_mb:.0f} | {result.rss_node_now_mb:.0f} |",
                  f"| transformers, whole model, load + generate | {result.rss_whole_mb:.0f} | |",
                  "", "Both include ~320 MB for the interpreter and the imports (torch, transformers, grpc). A node's "
                  "peak comes while it re-lays its weights out (the memory-mapped shard pages and the new copies "
                  "are resident together for a moment)."]
    lines += ["", "### 6. Bytes per token per hop", "", "See the wire formats section (`potluck bench-wire`)."]
    if plot_name:
        lines += ["", f"![decode, WAN and concurrency]({plot_name})"]
    return "\n".join(lines) + "\n"


def _weights_lines(result: PerfResult) -> list[str]:
    if not result.node_exact:
        return ["- node weights: dense float32"]
    held = ", ".join(f"{count} as {fmt}" for fmt, count in sorted(result.node_exact.items()))
    return [
        f"- node weights: the first node holds its matrices in the narrow forms their float32 values are exactly "
        f"({held}; common/weights/exact.py), the same values bit for bit, and so does the client's head where it can; "
        "the row marked `--no-exact` is the same chain with every matrix dense"
    ]


def _batched_lines(result: PerfResult) -> list[str]:
    """One session with a batch of N rows (one generate call), in the same rounds as the sessions."""
    lines = ["", "The same prompts as one generate call over a batch of N rows, in one session (what "
                 "llama-batched-bench does: N sequences decoded together by one caller), right after each round's "
                 "N sessions; medians. Decoding: the new tokens after the first, over the time from the first to "
                 "the last. Tokens: each row of the first round against plain transformers' greedy tokens for that "
                 "prompt alone.",
             "", "| batch | tok/s in all | vs N sessions | decoding, tok/s | tokens equal transformers' |",
             "|---:|---:|---:|---:|---|"]
    sessions = {n: aggregate for n, aggregate, _, _ in result.concurrency}
    for n, runs in result.batched.items():
        aggregate, steady = (statistics.median(r[i] for r in runs) for i in (0, 1))
        exact = {True: "yes", False: "**no**"}.get(result.batched_exact.get(n), "not checked")
        versus = f"{aggregate / sessions[n]:.2f}x" if sessions.get(n) else "n/a"
        lines.append(f"| {n} | {aggregate:.1f} | {versus} | {steady:.1f} | {exact} |")
    lines += ["", "Tok/s in all of each round, batches: " + "; ".join(
        f"{n}: " + ", ".join(f"{r[0]:.1f}" for r in runs) for n, runs in result.batched.items()) + "."]
    return lines


def _llama_batched_lines(result: PerfResult) -> list[str]:
    """The concurrency table's peer: llama-batched-bench on the served file, in the same rounds."""
    s = result.settings
    served = s.llama_served.name if s.llama_served else "?"
    lines = ["", f"llama.cpp's `llama-batched-bench` on the file the swarm serves (`{served}`), one process with "
                 f"{result.machine['threads']} threads, N sequences in one context, each a 16-token prompt then "
                 f"{s.concurrency_tokens} new tokens (`-npp 16 -ntg {s.concurrency_tokens} -npl "
                 f"{','.join(map(str, s.concurrency))}`), once per round, taking turns with the swarm's rounds; "
                 "medians. Aggregate: new tokens over the whole run (prompts included), as the swarm's; decode: "
                 "new tokens over llama.cpp's decode time (its S_TG), beside the swarm's while-all-decode figure "
                 "(sessions) and decoding figure (a batch). The swarm two ways: N sessions of one client (a thread "
                 "each), and one session with a batch of N rows (one generate call, as llama-batched-bench).",
             "", "| N | swarm, N sessions | swarm, a batch of N | llama.cpp, N sequences | sessions / llama.cpp | "
                 "batch / llama.cpp | decode: sessions | batch | llama.cpp (S_TG) | sessions / llama.cpp | "
                 "batch / llama.cpp |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for sessions, aggregate, _, steady in result.concurrency:
        runs = result.llama_batched.get(sessions)
        if not runs:
            continue
        agg = statistics.median(r.aggregate_tps for r in runs)
        dec = statistics.median(r.decode_tps for r in runs)
        batch = result.batched.get(sessions)
        b_agg, b_dec = ((statistics.median(r[i] for r in batch) for i in (0, 1)) if batch else (0.0, 0.0))
        def ratio(x: float, y: float) -> str:
            return f"{x / y:.2f}x" if x and y else "n/a"
        lines.append(f"| {sessions} | {aggregate:.1f} | {b_agg:.1f} | {agg:.1f} | **{ratio(aggregate, agg)}** | "
                     f"**{ratio(b_agg, agg)}** | {steady:.1f} | {b_dec:.1f} | {dec:.1f} | {ratio(steady, dec)} | "
                     f"{ratio(b_dec, dec)} |")
    return lines


def _llama_lines(result: PerfResult) -> list[str]:
    s = result.settings
    lines = [
        "",
        "#### llama.cpp side by side",
        "",
        f"llama.cpp's `llama-bench` (decode test, {s.new_tokens} tokens) on GGUF files of the same weights, the file "
        f"the swarm serves first, taking turns with the swarm in each of {s.repeats} round(s): the swarm "
        f"({result.llama[0].servers} nodes, push), llama.cpp in one process with {result.machine['threads']} "
        f"threads, and llama.cpp over its RPC backend with {result.llama[0].servers} rpc servers on loopback (one "
        "thread each, every layer on the servers). On the served file the same turns are taken again by one node "
        "serving every layer (against llama.cpp in one process and over one rpc server) and by nodes started with "
        "`--numerics fast` with a client whose head computes so too (`--head-numerics fast`; llama.cpp's numerics: "
        "8-bit activations, integer dot products; docs/performance.md), "
        "each configuration in rounds of its own.",
        "",
        "| system | file | decode tok/s | ms/token | swarm vs it (same rounds) |",
        "|---|---|---:|---:|---:|",
    ]
    for side in result.llama:
        swarm, single, rpc = (statistics.median(x) for x in (side.swarm_tps, side.single_tps, side.rpc_tps))
        same = " (the file the swarm serves)" if side.served else ""
        lines += [
            f"| {side.swarm_label} | | {swarm:.2f} | {1000 / swarm:.1f} | |",
            f"| llama.cpp {side.kind}{same}, one process | `{side.gguf}` | {single:.2f} | {1000 / single:.1f} | "
            f"{swarm / single:.2f}x |",
            f"| llama.cpp {side.kind}{same} over RPC, {side.servers} servers | `{side.gguf}` | {rpc:.2f} | "
            f"{1000 / rpc:.1f} | {swarm / rpc:.2f}x |",
        ]
    lines += _llama_target_lines(result)
    for side in result.llama:
        per_run = "; ".join(
            f"{a:.2f} / {b:.2f} / {c:.2f}" for a, b, c in zip(side.swarm_tps, side.single_tps, side.rpc_tps)
        )
        lines += ["", f"Per round, {side.swarm_label} with `{side.gguf}` (swarm / llama.cpp one process / llama.cpp "
                      f"RPC): {per_run}."]
    return lines


def _llama_target_lines(result: PerfResult) -> list[str]:
    """Issue 28's ratios, each from the rounds its two sides took turns in, on the served file."""
    rows = []
    for side in (side for side in result.llama if side.served):
        swarm, single, rpc = (statistics.median(x) for x in (side.swarm_tps, side.single_tps, side.rpc_tps))
        if side.servers > 1:
            rows.append(f"| {side.swarm_label} vs llama.cpp over RPC, {side.servers} servers | {swarm / rpc:.2f}x |")
        else:
            rows.append(f"| {side.swarm_label} vs llama.cpp in one process | {swarm / single:.2f}x |")
    if not rows:
        return []
    return ["", "On the served file, the ratios that matter (each from the same rounds):", "",
            "| swarm vs llama.cpp | ratio |", "|---|---:|", *rows]


def write_plot(result: PerfResult, path: Path) -> bool:
    """Decode speeds, WAN shares and concurrency in one PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    speeds = [result.local, *result.swarms]
    axes[0].barh([x.label for x in speeds], [x.median for x in speeds], color="#4c72b0")
    axes[0].set_xlabel("decode tokens/s")
    axes[0].invert_yaxis()
    axes[0].set_title("1. decode (greedy, fp32)")
    if result.wan:
        for push, color in ((True, "#55a868"), (False, "#c44e52")):
            points = [w for w in result.wan if w.push == push]
            axes[1].plot([w.delay_ms for w in points], [100 * w.share for w in points], "o-", color=color,
                         label="push" if push else "no push")
        axes[1].axhline(90, ls="--", color="grey")
        axes[1].set_xlabel("one-way delay per hop (ms)")
        axes[1].set_ylabel("% of the physical limit")
        axes[1].legend()
        axes[1].set_title("2. simulated WAN, 3 nodes")
    if result.concurrency:
        axes[2].plot([c[0] for c in result.concurrency], [c[1] for c in result.concurrency], "o-", color="#8172b2")
        axes[2].set_xscale("log", base=2)
        axes[2].set_xlabel("concurrent sessions")
        axes[2].set_ylabel("aggregate tokens/s")
        axes[2].set_title("3. concurrency, 3 nodes")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
