"""Reports with findings for the tests of everything that shows them (store, API, client, CLI, dashboard).

The engine decides which findings a real run has, so the tests of the display side build reports with
known findings here and store them as a worker would.
"""

from __future__ import annotations

from sqlalchemy import Engine, update

from graddiag.models.shapes import LayerKind
from graddiag.models.spec import Spec
from graddiag.service.engine.report import (
    EvalResult,
    Evidence,
    Finding,
    FindingKind,
    Label,
    LayerInfo,
    LayerRecord,
    ModelDescription,
    Report,
    Severity,
    StepMetrics,
    Theory,
    TimeRecord,
    Timing,
    Verdict,
)
from graddiag.service.store.db import make_sessionmaker
from graddiag.service.store.runs import create_run, insert_report_rows, report_columns, report_rows
from graddiag.service.store.tables import Run, stamp

SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "info")


def plain_report(spec: Spec, label: Label = "healthy") -> Report:
    """A deterministic report shaped like the engine's, without findings: depth + 1 linear layers, every
    step, records at the recorded steps; the gradient norm falls 10× per layer toward the input and the
    forward RMS (`act_norm`) doubles per layer, so charts and tables have known values to show."""
    names = ["input.linear", *(f"hidden{j}.linear" for j in range(1, spec.depth)), "output.linear"]
    layers = [LayerInfo(index=i, name=name, kind="linear", params=100 * (i + 1)) for i, name in enumerate(names)]
    last = len(layers) - 1
    recorded = [s for s in range(spec.steps) if s % spec.record_every == 0 or s == spec.steps - 1]
    records = [
        LayerRecord(
            step=s,
            layer=i,
            grad_norm=10.0 ** (i - last) * (1 + s),
            bias_grad_norm=0.1,
            weight_norm=2.0,
            rel_grad=10.0 ** (i - last) / 2,
            update_ratio=None if s == 0 else 1e-3,
            act_grad_norm=10.0 ** (i - last),
            zero_grad_frac=0.0,
            saturation_frac=None,
            act_norm=2.0**i * (1 + s),
            penalty_grad_norm=None,
        )
        for s in recorded
        for i in range(len(layers))
    ]
    steps = [
        StepMetrics(step=s, loss=2.3 - 0.01 * s, accuracy=0.1, grad_norm_total_pre=1.0, grad_norm_total_post=1.0)
        for s in range(spec.steps)
    ]
    verdict = Verdict(
        label=label,
        at_init=label,
        trained=label,
        evidence=Evidence(decades_per_layer=-1.0, interior_ratio=10.0 ** -(last - 2), interior_layers=last - 1),
        reasons=["The gradient falls 1 decade per layer toward the input."],
        advice=[],
        theory=Theory(applicable=False, reason="Not derived for this test report."),
    )
    return Report(
        spec=spec,
        layers=layers,
        steps=steps,
        records=records,
        verdict=verdict,
        eval=EvalResult(
            loss=2.2, accuracy=0.1, samples=10, train_loss=2.25, train_accuracy=0.12, generalization_gap=-0.05
        ),
        timing=Timing(
            device="cpu", data_s=0.0, train_s=0.1, eval_s=0.0, total_s=0.1, step_ms=20.0, steps_run=spec.steps
        ),
    )


def recurrent_report(spec: Spec, label: Label = "healthy", time_steps: int = 32) -> Report:
    """plain_report's figures for a recurrent spec (arch rnn, gru or lstm), with the network's layer names
    (`<arch><i>.ih` linear, `<arch><i>.hh` recurrent, `output.linear`) and time records of every `.hh`
    layer at every recorded step with known values: ‖∂L/∂h_t‖ = 10^(-0.1·(T-1-t)) · (1 + step) / (layer
    index + 1), falling 0.1 decade per time step toward t = 0; the cell's gradient (lstm) is twice that;
    gate means (lstm, gru) and the saturated fraction (null for relu) vary with t."""
    base = plain_report(spec, label)
    names = [name for i in range(1, spec.depth + 1) for name in (f"{spec.arch}{i}.ih", f"{spec.arch}{i}.hh")]
    layers = [
        LayerInfo(index=i, name=name, kind="recurrent" if name.endswith(".hh") else "linear", params=100 * (i + 1))
        for i, name in enumerate([*names, "output.linear"])
    ]
    template = {record.step: record for record in base.records if record.layer == 0}
    records = [
        template[step].model_copy(update={"layer": layer.index, "grad_norm": 0.1 * (layer.index + 1) * (1 + step)})
        for step in template
        for layer in layers
    ]
    time_records = [
        TimeRecord(
            step=step,
            layer=layer.index,
            t=t,
            grad_norm=10.0 ** (-0.1 * (time_steps - 1 - t)) * (1 + step) / (layer.index + 1),
            cell_grad_norm=2 * 10.0 ** (-0.1 * (time_steps - 1 - t)) * (1 + step) if spec.arch == "lstm" else None,
            state_rms=0.5 + t / (4 * time_steps),
            gate_mean=None if spec.arch == "rnn" else 0.5 + t / (4 * time_steps),
            saturation_frac=None if spec.activation == "relu" else t / (2 * time_steps),
        )
        for step in template
        for layer in layers
        if layer.kind == "recurrent"
        for t in range(time_steps)
    ]
    return base.model_copy(update={"layers": layers, "records": records, "time_records": time_records})


def finding(kind: FindingKind, index: int = 0) -> Finding:
    """A finding of `kind` whose severity cycles critical, warning, info with `index`, with evidence
    numbers of every type (float, int, str, null), two layers and one advice item naming it."""
    return Finding(
        kind=kind,
        severity=SEVERITIES[index % 3],
        phase="init" if index % 2 == 0 else "training",
        message=f"The {kind.replace('_', ' ')} finding, number {index}.",
        evidence={"span_decades": 2.5 + index, "interior_layers": 7, "note": "x", "missing": None},
        layers=[0, index],
        advice=[f"Change something about {kind} (finding: {kind})."],
    )


def with_findings(report: Report, *kinds: FindingKind) -> Report:
    """`report` with one finding per kind (see `finding`) whose advice is the verdict's, forward-signal
    RMS in every record (0.5 + layer index where the report has none), a penalty gradient at step 0, and
    its first layer's bias flagged structurally zero."""
    findings = [finding(kind, i) for i, kind in enumerate(kinds)]
    verdict = report.verdict.model_copy(
        update={"findings": findings, "advice": [item for f in findings for item in f.advice]}
    )
    records = [
        r.model_copy(
            update={
                "act_norm": 0.5 + r.layer if r.act_norm is None else r.act_norm,
                "penalty_grad_norm": None if r.step else 1e-3 * (r.layer + 1),
            }
        )
        for r in report.records
    ]
    layers = [report.layers[0].model_copy(update={"structural_zero_bias": True}), *report.layers[1:]]
    return report.model_copy(update={"verdict": verdict, "records": records, "layers": layers})


def succeed(engine: Engine, run_id: str, report: Report) -> None:
    """Store `report` as the run's result, as a worker's completion does (minus the lease checks)."""
    with make_sessionmaker(engine)() as session:
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(status="succeeded", **report_columns(report), **stamp("finished"))
        )
        insert_report_rows(session, report_rows(run_id, report))
        session.commit()


def store_report(engine: Engine, report: Report) -> str:
    """Id of a new succeeded run of `report.spec` holding `report`."""
    with make_sessionmaker(engine)() as session:
        run_id = create_run(session, Spec.model_validate(report.spec))[0].id
    succeed(engine, run_id, report)
    return run_id


def external_report(depth: int = 4, steps: int = 6, record_every: int = 2) -> Report:
    """plain_report's numbers as the report of a model graddiag did not build (as graddiag.diagnose makes
    them): no spec, a ModelDescription, layer names of a torchvision-like model, one branch layer."""
    base = plain_report(Spec(depth=depth, steps=steps, record_every=record_every, dataset="synthetic"))
    names = ["conv1", *(f"layer{j}.conv" for j in range(1, depth)), "fc"]
    layers = [
        layer.model_copy(update={"name": name, "kind": "linear" if name == "fc" else "conv"})
        for layer, name in zip(base.layers, names, strict=True)
    ]
    verdict = base.verdict.model_copy(
        update={"theory": Theory(applicable=False, reason="Mean-field theory is derived for graddiag's own networks.")}
    )
    model = ModelDescription(
        class_name="TinyNet",
        params=sum(layer.params for layer in layers),
        optimizer="sgd",
        lr=0.01,
        loss="cross_entropy",
        activations=["relu"],
        width=64,
        branches=[2],
    )
    return base.model_copy(update={"spec": None, "model": model, "layers": layers, "verdict": verdict})


def transformer_report(spec: Spec, label: Label = "healthy") -> Report:
    """plain_report's steps and verdict for a transformer spec, with the network's layer names and kinds in
    forward order (the patch embedding, the position table and, with cls pooling, the class token; per block
    norm1, attn.q/k/v/out, norm2, mlp.fc1, mlp.fc2 with pre-LN, attn.q/k/v/out, norm1, mlp.fc1, mlp.fc2, norm2
    with post-LN, as models/networks.py registers them; the final norm with pre-LN; the output layer) and records
    with known values at every recorded step: layer i has ‖∂L/∂W‖ = 0.01·(i + 1)·(1 + step) and
    ‖∂L/∂h‖ = 0.1·(i + 1)·(1 + step)."""
    base = plain_report(spec, label)
    attention: list[tuple[str, LayerKind]] = [(f"attn.{part}", "attention") for part in ("q", "k", "v", "out")]
    mlp: list[tuple[str, LayerKind]] = [("mlp.fc1", "linear"), ("mlp.fc2", "linear")]
    if spec.norm_position == "pre":
        block = [("norm1", "norm"), *attention, ("norm2", "norm"), *mlp]
    else:
        block = [*attention, ("norm1", "norm"), *mlp, ("norm2", "norm")]
    named: list[tuple[str, LayerKind]] = [("embed.linear", "linear"), ("embed.pos", "embedding")]
    named += [("embed.cls", "embedding")] if spec.pooling == "cls" else []
    named += [(f"block{i}.{name}", kind) for i in range(1, spec.depth + 1) for name, kind in block]
    named += [("norm", "norm")] if spec.norm_position == "pre" else []
    named += [("output.linear", "linear")]
    layers = [LayerInfo(index=i, name=name, kind=kind, params=100 * (i + 1)) for i, (name, kind) in enumerate(named)]
    template = {record.step: record for record in base.records if record.layer == 0}
    records = [
        template[step].model_copy(
            update={
                "layer": layer.index,
                "grad_norm": 0.01 * (layer.index + 1) * (1 + step),
                "act_grad_norm": 0.1 * (layer.index + 1) * (1 + step),
            }
        )
        for step in template
        for layer in layers
    ]
    return base.model_copy(update={"layers": layers, "records": records})
