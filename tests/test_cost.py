"""Cost models (coarse / mid / fine), features, dataset generation and the bundled model."""

from __future__ import annotations

import numpy as np
import pytest

from tvm_hapm.cost import (
    FEATURE_SCHEMA_VERSION,
    BlockSparsity,
    CoarseModel,
    ConvLayer,
    FineModel,
    MidModel,
    SchemaVersionError,
    block_mask,
    feature_names,
    features,
    load_bundled_fine_model,
)
from tvm_hapm.cost.dataset import generate, load_samples, measure
from tvm_hapm.cost.train import dataset_matrix, mape
from tvm_hapm.target.config import PRESETS

ZED = PRESETS["zedboard"]
HAND = [
    ConvLayer(1, 64, 28, 28, 64, 3, 3, padding=1),
    ConvLayer(1, 32, 20, 20, 48, 1, 1),
    ConvLayer(1, 40, 16, 16, 40, 3, 3, (2, 2), 1, groups=40),
    ConvLayer(1, 96, 7, 7, 160, 3, 3, padding=1),
    ConvLayer.dense(1, 200, 10),
]


def test_feature_vector_stable_and_versioned():
    names = feature_names()
    assert isinstance(FEATURE_SCHEMA_VERSION, int)
    assert len(names) == len(set(names))
    assert {"sched_tile_h", "sched_tile_w", "sched_cob_group", "sched_cib_chunk"} <= set(names)
    f1 = features(HAND[0], ZED, None, 0.3)
    f2 = features(HAND[0], ZED, None, 0.3)
    assert f1.shape == (len(names),) and f1.dtype == np.float32
    np.testing.assert_array_equal(f1, f2)
    assert np.all(np.isfinite(f1))


@pytest.mark.parametrize("layer", HAND, ids=lambda layer: f"{layer.cin}x{layer.h}k{layer.kh}")
def test_mid_model_within_10_percent_of_simulator(layer):
    for cfg in (ZED, PRESETS["zcu104"]):
        sim = measure(layer, cfg)
        mid = MidModel().predict(layer, cfg)
        assert abs(mid.cycles / sim["cycles"] - 1) < 0.10
        assert abs(mid.energy_uj / sim["energy_uj"] - 1) < 0.10


def test_predictions_monotone_in_zero_blocks():
    layer = ConvLayer(1, 64, 28, 28, 128, 3, 3, padding=1)
    fine = load_bundled_fine_model()
    rng = np.random.default_rng(0)
    mask = block_mask(layer, ZED, None)
    masks = [mask.copy()]
    order = rng.permutation(mask.size)
    for frac in (0.25, 0.5, 0.75):  # nested: each removes more blocks than the last
        m = mask.copy().reshape(-1)
        m[order[: int(frac * mask.size)]] = False
        masks.append(m.reshape(mask.shape))
    for model in (MidModel(), fine):
        cyc = [model.predict(layer, ZED, None, BlockSparsity.from_mask(m)).cycles for m in masks]
        assert all(a > b for a, b in zip(cyc, cyc[1:])), (model.name, cyc)
    sims = [measure(layer, ZED, None, m)["cycles"] for m in masks]
    assert all(a > b for a, b in zip(sims, sims[1:]))


def _small_records(tmp_path, n=24):
    return generate(tmp_path / "s.jsonl", n, seed=3, workers=1, progress=False)


def test_dataset_resumes_and_is_deterministic(tmp_path):
    recs = _small_records(tmp_path)
    assert len(recs) == 24
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    again = generate(tmp_path / "s.jsonl", 24, seed=3, workers=1, progress=False)
    assert (tmp_path / "s.jsonl").read_text().splitlines() == lines  # nothing added
    assert [r["id"] for r in again] == list(range(24))
    other = generate(tmp_path / "t.jsonl", 24, seed=3, workers=1, progress=False)
    key = [(r["id"], r["result"]["cycles"], r["result"]["energy_uj"]) for r in recs]
    assert key == [(r["id"], r["result"]["cycles"], r["result"]["energy_uj"]) for r in other]
    assert len(load_samples(tmp_path / "s.jsonl")) == 24


def test_fine_model_save_load_and_schema_refusal(tmp_path):
    recs = _small_records(tmp_path, 16)
    X, y, mids, _ = dataset_matrix(recs)
    model = FineModel.train(X, y[:, 0], y[:, 1], mids, rounds=5)
    for fmt in ("json", "ubj"):
        path = model.save(tmp_path / f"m_{fmt}.json", fmt=fmt)
        back = FineModel.load(path)
        np.testing.assert_allclose(back.predict_matrix(X, mids), model.predict_matrix(X, mids))
    side = path.read_text().replace(
        f'"feature_schema_version": {FEATURE_SCHEMA_VERSION}', '"feature_schema_version": 999'
    )
    path.write_text(side)
    with pytest.raises(SchemaVersionError, match="schema version 999"):
        FineModel.load(path)


def test_bundled_fine_model_beats_coarse(tmp_path):
    fine = load_bundled_fine_model()
    recs = generate(tmp_path / "h.jsonl", 20, seed=12345, workers=1, progress=False)
    recs = [r for r in recs if "result" in r]
    X, y, mids, _ = dataset_matrix(recs)
    pred = fine.predict_matrix(X, mids)
    from tvm_hapm.cost.dataset import spec_objects

    coarse = []
    for r in recs:
        layer, cfg, sched, mask = spec_objects(r)
        coarse.append(CoarseModel().predict(layer, cfg, sched, BlockSparsity.from_mask(mask)))
    m_fine = mape(pred[:, 0], y[:, 0])
    m_coarse = mape([c.cycles for c in coarse], y[:, 0])
    assert m_fine < m_coarse and m_fine < 0.10


def test_predict_network_sums_layers():
    mid = MidModel()
    total = mid.predict_network(HAND, ZED, sparsities=0.2)
    parts = [mid.predict(layer, ZED, None, 0.2) for layer in HAND]
    assert total.cycles == pytest.approx(sum(p.cycles for p in parts))
    assert total.energy_uj == pytest.approx(sum(p.energy_uj for p in parts))
