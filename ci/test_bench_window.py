"""Tests of ci/bench_window.py, the "Inside the runs" table of `just bench`."""

import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_window import sync_buckets, tables_written, window_row  # noqa: E402


def prom(count, le_10ms, le_100ms):
    """A node's /metrics with the sync histogram and an unrelated histogram."""
    return (
        "# TYPE dynamo_storage_write_seconds histogram\n"
        'dynamo_storage_write_seconds_bucket{le="+Inf"} 999\n'
        "# TYPE dynamo_storage_sync_seconds histogram\n"
        f'dynamo_storage_sync_seconds_bucket{{le="0.005"}} {le_10ms - 1}\n'
        f'dynamo_storage_sync_seconds_bucket{{le="0.01"}} {le_10ms}\n'
        f'dynamo_storage_sync_seconds_bucket{{le="0.1"}} {le_100ms}\n'
        f'dynamo_storage_sync_seconds_bucket{{le="+Inf"}} {count}\n'
        f"dynamo_storage_sync_seconds_count {count}\n"
    )


class WindowRow(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.results = self.dir.name
        self.doc = {"throughput_ops_per_s": 1000.0, "p99_ms": 7.5}

    def tearDown(self):
        self.dir.cleanup()

    def write(self, name, text):
        with open(os.path.join(self.results, name), "w") as f:
            f.write(text)

    def snapshots(self, syncs_b=((150, 140, 149), (120, 120, 120), (110, 100, 110))):
        # 4 s window; 100 ticks/s. Machine: 800 ticks pass, 200 of them idle or
        # iowait -> 75% busy. Nodes: 300 + 100 ticks = 4 s of CPU over 4,000
        # ops -> 1000 us per op. Resident: 1024 pages of 4 KiB more -> 1 MiB/s.
        self.write("run.a.proc", "cpu  1000 0 500 3000 100 0 0 0 0 0\nnode 100 1000\nnode 50 1000\nhz 100 4096\n")
        self.write("run.b.proc", "cpu  1400 0 700 3150 150 0 0 0 0 0\nnode 400 1512\nnode 150 1512\nhz 100 4096\n")
        for i, b in enumerate(syncs_b):
            self.write(f"run.a.n{i}.prom", prom(100, 100, 100))
            self.write(f"run.b.n{i}.prom", prom(*b))
        # Node 0 flushed (table 3) and compacted (4 and 5 replace 0-2), node 1
        # flushed a blob keyspace's table, node 2 wrote nothing.
        self.write("run.a.n0.tables", "./1/tables/0\n./1/tables/1\n./1/tables/2\n")
        self.write("run.b.n0.tables", "./1/tables/3\n./1/tables/4\n./1/tables/5\n")
        self.write("run.a.n1.tables", "./1/tables/0\n")
        self.write("run.b.n1.tables", "./1/tables/0\n./2/tables/0\n")
        self.write("run.a.n2.tables", "")
        self.write("run.b.n2.tables", "")

    def test_a_row_gives_busy_share_cpu_per_op_growth_and_slow_fsyncs_per_node(self):
        self.snapshots()
        row = window_row(self.results, "run", 4, self.doc)
        self.assertEqual(
            row,
            "| run | 1,000 | 75% | 1000 us | 1.0 MiB/s | 50/20/10 | 10/0/10 | 1/0/0 | 3/1/0 | 7.5 |",
        )

    def test_a_node_whose_scrape_failed_is_left_out_and_none_shows_a_question_mark(self):
        self.snapshots()
        self.write("run.b.n1.prom", "")
        row = window_row(self.results, "run", 4, self.doc)
        self.assertIn("| 50/10 | 10/10 | 1/0 | 3/1/0 |", row)
        for i in range(3):
            self.write(f"run.b.n{i}.prom", "")
        self.assertIn("| ? | ? | ? |", window_row(self.results, "run", 4, self.doc))

    def test_a_missing_or_broken_snapshot_gives_no_row(self):
        self.snapshots()
        os.remove(os.path.join(self.results, "run.b.proc"))
        self.assertIsNone(window_row(self.results, "run", 4, self.doc))
        self.write("run.b.proc", "node 1 2\nhz 100 4096\n")
        self.assertIsNone(window_row(self.results, "run", 4, self.doc))

    def test_a_missing_table_listing_leaves_that_node_out(self):
        self.snapshots()
        os.remove(os.path.join(self.results, "run.a.n1.tables"))
        self.assertIn("| 1/0/0 | 3/0 | 7.5 |", window_row(self.results, "run", 4, self.doc))
        for i in range(3):
            os.remove(os.path.join(self.results, f"run.b.n{i}.tables"))
        self.assertIn("| 1/0/0 | ? | 7.5 |", window_row(self.results, "run", 4, self.doc))
        self.assertIsNone(tables_written(os.path.join(self.results, "none.a"), os.path.join(self.results, "none.b")))

    def test_sync_buckets_reads_only_the_sync_histogram(self):
        path = os.path.join(self.results, "m.prom")
        self.write("m.prom", prom(30, 25, 29))
        self.assertEqual(sync_buckets(path), (30, 5, 1))
        self.write("m.prom", "dynamo_storage_write_seconds_bucket{le=\"+Inf\"} 4\n")
        self.assertIsNone(sync_buckets(path))


if __name__ == "__main__":
    unittest.main()
