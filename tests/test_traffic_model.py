"""The DRAM-traffic model (fused_ls/bench/traffic.py) counts what each launch moves."""

from __future__ import annotations

import pytest

from fused_ls.bench.traffic import GPUS, Launch, predict, resident_from


def test_a_second_read_costs_dram_traffic_only_when_the_rows_in_flight_overflow_l2():
    h200 = GPUS["H200"]
    V, b = 128256, 2  # 256 KB a bf16 row
    # 2 programs an SM: 264 rows in flight, 66 MB, more than 3/4 of a 50 MB L2.
    streamed = predict(Launch("streamed", 4096, 8), 2, h200, 16384, V, b)
    assert streamed["rows_in_flight"] == 264 and not streamed["l2_fit"]
    assert streamed["bytes_per_logit"] == 3 * b and streamed["traffic"] == pytest.approx(2 / 3)
    # Sized to L2: floor(0.75 * 50 MiB / 256512 B) = 153 rows, within the 264 that may be resident.
    persistent = predict(Launch("persistent", 4096, 8, 0), 2, h200, 16384, V, b)
    assert persistent["rows_in_flight"] == 153 and persistent["l2_fit"]
    assert persistent["bytes_per_logit"] == 2 * b and persistent["traffic"] == 1.0


def test_a_split_row_is_read_once_and_its_bytes_in_flight_bound_the_bandwidth():
    h200 = GPUS["H200"]
    split = predict(Launch("split", 8192, 8, 1), 1, h200, 16384, 128256, 2)
    # 16 segments a row, (132 // 16) * 16 = 128 programs, 8 rows at a time.
    assert split["rows_in_flight"] == 8 and split["bytes_per_logit"] == 4
    needed = h200.bandwidth * h200.latency / h200.sms  # Little's law, bytes an SM must keep in flight
    assert split["in_flight_kib"] * 1024 == pytest.approx(128 / 132 * 8192 * 2)
    assert split["latency"] == pytest.approx(128 / 132 * 8192 * 2 / needed)
    assert split["predicted"] == pytest.approx(min(1.0, split["latency"]))


def test_resident_programs_are_read_from_the_compile_report():
    rows = [
        {"kernel": "smoothed_xent_fwd_kernel bf16 HAS_WEIGHT=0 HAS_SOFTCAP=0 BLOCK=4096 SINGLE_PASS=0 "
                   "EMULATE_RTNE_BF16=0 WRITE_GRAD=1 PERSISTENT=0 L2_HINTS=0 warps=8", "programs_per_sm": 2},
        {"kernel": "smoothed_xent_fwd_kernel bf16 HAS_WEIGHT=1 HAS_SOFTCAP=0 BLOCK=4096 SINGLE_PASS=0 "
                   "EMULATE_RTNE_BF16=0 WRITE_GRAD=1 PERSISTENT=0 L2_HINTS=0 warps=8", "programs_per_sm": 1},
        {"kernel": "smoothed_xent_split_kernel bf16 HAS_WEIGHT=0 HAS_SOFTCAP=0 BLOCK=8192 SEGMENTS=16 "
                   "SEGMENTS_POW2=16 EMULATE_RTNE_BF16=0 WRITE_GRAD=1 PHASE=0 warps=8", "programs_per_sm": 1},
    ]
    assert resident_from(rows) == {("streamed", 4096, 8): 2, ("split", 8192, 8): 1}


def test_an_8_kib_chunk_program_keeps_two_chunks_in_flight_but_never_more_than_its_row():
    h200 = GPUS["H200"]
    # Chunk k + 1 is loaded while chunk k is folded: 2 programs an SM x 2 chunks x 8 KiB.
    long_rows = predict(Launch("streamed", 4096, 8), 2, h200, 16384, 128256, 2)
    assert long_rows["in_flight_kib"] == pytest.approx(2 * 2 * 4096 * 2 / 1024)
    # A 6000-logit row is all there is to load ahead.
    short_rows = predict(Launch("streamed", 4096, 8), 2, h200, 16384, 6000, 2)
    assert short_rows["in_flight_kib"] == pytest.approx(2 * 6000 * 2 / 1024)
    # 16 KiB chunks (8192 bf16 or 4096 fp32 logits) are loaded one at a time.
    wide = predict(Launch("streamed", 8192, 16), 1, h200, 16384, 128256, 2)
    assert wide["in_flight_kib"] == pytest.approx(8192 * 2 / 1024)
    fp32 = predict(Launch("streamed", 4096, 16), 1, h200, 16384, 128256, 4)
    assert fp32["in_flight_kib"] == pytest.approx(4096 * 4 / 1024)
