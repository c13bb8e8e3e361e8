"""The IRECE report's one conversion: runtime IreceReport -> wire (pb.IreceReport) -> JSON form.

The JSON form is the runtime's own `IreceReport.to_dict()` (what `irece generate --json` prints); the service
sends `to_proto(report)`, and the client (`irece client --json`, the demo) turns what arrives back into the same
dict with `to_dict(msg)`. Field names are shared, so a field added on one side and not the other fails loudly.
"""
from __future__ import annotations

from dataclasses import fields

from irece_runtime.irece import ConceptReport, IreceReport
from protos.irece.v1 import generation_pb2 as pb


# ConceptReport's fields that travel; those marked wire=False (which images of a batch) stay on the server
WIRE = tuple(f.name for f in fields(ConceptReport) if f.metadata.get("wire", True))
HIDDEN = ("peak", "score", "threshold", "conditioning_score")  # what hide_scores withholds from clients (NaN on the wire)


def to_proto(report: IreceReport | None, hide_scores: bool = False) -> pb.IreceReport:
    """None (no concept to suppress, IRECE did not run) is the empty report: step_index and timestep -1.
    hide_scores: the gate's numbers (presence score, threshold, attention peak) go out as NaN - a query-based
    attacker reading them learns how far each image stands from the threshold (`irece bench adaptive`, pgd-bb)."""
    r = report if report is not None else IreceReport()
    concepts = [{k: getattr(c, k) for k in WIRE} | ({k: float("nan") for k in HIDDEN} if hide_scores else {})
                for c in r.concepts]
    return pb.IreceReport(intervened=r.intervened, mask_area=r.mask_area, step_index=r.step_index,
                          timestep=r.timestep, concepts=[pb.ConceptReport(**c) for c in concepts],
                          unconditioned=r.unconditioned)


def to_dict(msg: pb.IreceReport) -> dict:
    """The wire report as `IreceReport.to_dict()` gives it (floats as float32, the wire's precision)."""
    concepts = [ConceptReport(**{k: getattr(c, k) for k in WIRE}) for c in msg.concepts]
    d = IreceReport(step_index=msg.step_index, timestep=msg.timestep, concepts=concepts,
                    unconditioned=msg.unconditioned).to_dict()
    d.update(intervened=msg.intervened, mask_area=msg.mask_area)  # the union mask stays on the server; its area travels
    return d
