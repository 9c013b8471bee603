"""Stored runs with large, random reports, for export benchmarks and the tests that check exports.

The figures are random: they measure how fast the store and the API move records, not the engine.
"""

from __future__ import annotations

import random

from sqlalchemy import Engine

from graddiag.models.spec import Spec
from graddiag.service.engine.probe import run_probe
from graddiag.service.engine.report import LayerInfo, LayerRecord
from graddiag.service.store.db import make_sessionmaker
from graddiag.service.store.runs import create_run
from graddiag.service.worker.queue import claim_next, complete

_SHAPE = Spec(dataset="synthetic", depth=3, width=16, steps=5, batch_size=16, record_every=1)


def store_random_run(engine: Engine, layers: int, steps: int, seed: int = 0) -> str:
    """Id of a succeeded run whose report holds `layers` × `steps` records of random figures.

    The run goes through the queue like any other (created, claimed, completed by its attempt), so
    its rows are exactly what a worker would have written.
    """
    spec = _SHAPE.model_copy(update={"depth": layers - 1, "steps": steps})
    with make_sessionmaker(engine)() as session:
        run_id = create_run(session, spec)[0].id
    claim = claim_next(engine, "samples", lease_seconds=600)
    if claim is None or claim.run_id != run_id:
        raise RuntimeError("store_random_run needs a queue with no other queued run")
    rng = random.Random(seed)
    stats = [f for f in LayerRecord.model_fields if f not in ("step", "layer")]
    report = run_probe(_SHAPE, eval_samples=10).model_copy(
        update={
            "spec": spec,
            "layers": [LayerInfo(index=i, name=f"hidden{i}.linear", kind="linear", params=1) for i in range(layers)],
            "records": [
                LayerRecord(step=s, layer=i, **{f: rng.lognormvariate(0, 3) for f in stats})
                for s in range(steps)
                for i in range(layers)
            ],
        }
    )
    if not complete(engine, claim, report):
        raise RuntimeError(f"run {run_id} could not be completed")
    return run_id
