"""What the machine did inside one `just bench` run (ci/bench.sh).

bench.sh's `snapshot` writes, at the start and the end of a window inside a
run, NAME.{a,b}.proc (the machine's CPU counters from /proc/stat, one
"node TICKS RSS_PAGES" line per node process, "hz TICKS_PER_S PAGE_BYTES")
NAME.{a,b}.n{0,1,2}.prom (each node's /metrics) and NAME.{a,b}.n{0,1,2}.tables
(each node's fjall table files, one path per line). `window_row` turns the pair
into one row of BENCHMARKS.md's "Inside the runs" table.
"""

import os


def proc_snapshot(path):
    """((machine ticks, idle ticks), nodes' CPU ticks, nodes' resident bytes, ticks per second)."""
    cpu, node, rss, hz, page = None, 0, 0, 100, 4096
    with open(path) as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            if fields[0] == "cpu":
                ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
                cpu = (sum(ticks), ticks[3] + ticks[4])
            elif fields[0] == "node":
                node += int(fields[1])
                rss += int(fields[2])
            elif fields[0] == "hz":
                hz, page = int(fields[1]), int(fields[2])
    if cpu is None:
        raise ValueError(f"{path} has no cpu line")
    return cpu, node, rss * page, hz


def sync_buckets(path):
    """Journal fsyncs so far: (count, over 10 ms, over 100 ms) from one node's
    /metrics, or None if it holds no sync histogram (the scrape failed)."""
    buckets = {}
    with open(path) as f:
        for line in f:
            if line.startswith('dynamo_storage_sync_seconds_bucket{le="'):
                le, count = line.split('"')[1], line.rsplit(" ", 1)[1]
                buckets[le] = float(count)
    if "+Inf" not in buckets:
        return None
    total = buckets["+Inf"]
    return total, total - buckets.get("0.01", 0), total - buckets.get("0.1", 0)


def tables_written(a_path, b_path):
    """Table files present at the end of a window and not at its start: the
    memtable flushes and compactions inside it (None if a listing is missing)."""
    try:
        with open(a_path) as a, open(b_path) as b:
            before = {line.strip() for line in a if line.strip()}
            return sum(1 for line in b if line.strip() and line.strip() not in before)
    except OSError:
        return None


def window_row(results, name, secs, doc, nodes=3):
    """The table row for run NAME (its `dynamo bench` JSON is DOC) over a
    window of SECS seconds, or None when a snapshot is missing or unreadable."""
    base = os.path.join(results, name)
    try:
        (ta, ia), node_a, rss_a, hz = proc_snapshot(base + ".a.proc")
        (tb, ib), node_b, rss_b, _ = proc_snapshot(base + ".b.proc")
        syncs, tables = [], []
        for i in range(nodes):
            a, b = sync_buckets(f"{base}.a.n{i}.prom"), sync_buckets(f"{base}.b.n{i}.prom")
            if a and b:
                syncs.append(tuple(y - x for x, y in zip(a, b)))
            written = tables_written(f"{base}.a.n{i}.tables", f"{base}.b.n{i}.tables")
            if written is not None:
                tables.append(f"{written}")
    except (OSError, ValueError, IndexError):
        return None
    rate = doc["throughput_ops_per_s"]
    ops = rate * secs
    busy = 100 * (1 - (ib - ia) / max(1, tb - ta))
    per_op = (node_b - node_a) / hz / max(1, ops) * 1e6
    growth = (rss_b - rss_a) / max(1, secs) / 2**20

    def column(k):
        return "/".join(f"{s[k]:,.0f}" for s in syncs) or "?"

    return (f"| {name} | {rate:,.0f} | {busy:.0f}% | {per_op:.0f} us | {growth:.1f} MiB/s | "
            f"{column(0)} | {column(1)} | {column(2)} | {'/'.join(tables) or '?'} | {doc['p99_ms']} |")
