"""The judge's operators: evaluate and gate (score the new and the serving model on the current split, decide),
and the optional human approval after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.standard.operators.hitl import ApprovalOperator

from tagflow_ops.base import TagflowOperator, config_of, serving_model
from tagflow_ops.links import EndpointConsoleLink, EvaluationLink, ReportLink

if TYPE_CHECKING:
    from airflow.sdk import Context


class EvaluateGateOperator(TagflowOperator):
    """Score the new model and the serving one on the dataset's current validation split (tagflow.evaluate, in
    the algorithm environment), write the evaluation (and its report) under PREFIX/output/JOB/evaluation/, record
    the model's lineage beside it, and decide by the form's gate rule. Returns the decision the deploy tasks use.

    One task, not two: the decision is a pure function of the evaluation document, so a separate gate task would
    only pass that document along; and the champion must be looked up in the same task that scores it, or a deploy
    in between could make the gate judge against a model that no longer serves. `candidates` are the training
    branches' task IDs; the one that ran left its result in XCom; `training` is the task that decided to train.
    """

    operator_extra_links = (ReportLink(), EvaluationLink(), EndpointConsoleLink())

    def __init__(self, *, candidates: Sequence[str], training: str = "choose_training", **kwargs: Any):
        super().__init__(**kwargs)
        self.candidates = list(candidates)
        self.training = training

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import deploy, evaluate, jobs

        cfg = config_of(self.config)
        ti = context["ti"]
        results = [r for r in ti.xcom_pull(task_ids=self.candidates) if r]
        if len(results) != 1:
            raise ValueError(f"expected one training result among {self.candidates}, found {len(results)}")
        candidate = jobs.candidate(results[0], cfg.objective_metric)
        lineage = (ti.xcom_pull(task_ids=self.training) or {}).get("lineage")
        champion = serving_model(self, cfg)
        if champion == candidate["model_data_url"]:
            champion = None  # a retry after this model was deployed: it is no rival of itself
        self.log.info("evaluating %s against %s", candidate["model_data_url"], champion or "no serving model")
        batch = jobs.evaluation_batch_size(jobs.read_manifest(cfg.dataset_uri, self.aws.s3))
        doc = evaluate.evaluate(
            candidate["model_data_url"], cfg.dataset_uri, client=self.aws.s3, champion_uri=champion,
            lift=cfg.gate_lift, threshold=cfg.gate_threshold, tolerance=cfg.gate_tolerance, batch_size=batch,
        )  # fmt: skip
        decision = deploy.judge(doc, metric=cfg.gate_metric, lift=cfg.gate_lift, threshold=cfg.gate_threshold,
                                tolerance=cfg.gate_tolerance)  # fmt: skip
        if not cfg.deploy:
            decision = {**decision, "deploy": False, "reason": f"deploy is off for this run ({decision['reason']})"}
        doc = {**doc, "gate": decision, "lineage": lineage, "training": candidate}
        evaluation = evaluate.write_evaluation(doc, cfg.dataset_uri, candidate["job"], self.aws.s3)
        lineage_uri = jobs.write_lineage(lineage, candidate["model_data_url"], self.aws.s3) if lineage else None
        figures = deploy.summary(doc, decision, cfg.gate_metric)
        self.log.info("gate: %s", decision["reason"])
        # approve_deploy asks a person only for a model the gate would deploy, and only under manual approval.
        ask = bool(decision["deploy"]) and cfg.approval == "manual"
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {
                "model_data_url": candidate["model_data_url"], "job": candidate["job"], **figures,
                "evaluation": evaluation, "lineage": lineage, "approval": "pending" if ask else cfg.approval,
            }  # fmt: skip
        route = cfg.backend if decision["deploy"] else "keep"  # choose_deploy's key
        return {**figures, "candidate": candidate, "route": route, "evaluation": evaluation,
                "report": report_uri(evaluation), "lineage_uri": lineage_uri, "rule": decision.get("rule"),
                "approval_required": ask}  # fmt: skip


def report_uri(evaluation_uri: str) -> str:
    """The report beside an evaluation document (tagflow.evaluate writes both to PREFIX/output/JOB/evaluation/)."""
    return evaluation_uri.rsplit("/", 1)[0] + "/report.html"


class DeployApprovalOperator(ApprovalOperator):
    """The standard provider's ApprovalOperator (Airflow's human-in-the-loop: the run's Required actions, or the
    REST API's hitlDetails) between the gate and the deploy, asked only when the gate's `decision` says so
    (`approval_required`: the gate would deploy and the form's approval is manual); otherwise it is skipped and the
    deploy goes on. Its body is the comparison table and the report's link (`tagflow.deploy.approval_body`).

    Approve: the deploy runs. Reject, or no answer within the form's approval_timeout_h (the timeout's default is
    Reject, applied by the scheduler): the provider skips `choose_deploy`, so the endpoint is untouched. Either way
    the task succeeds, returns the answer (`tagflow.deploy.approval_outcome`, which the run's note shows) and emits
    a `tagflow-model` asset event with the final decision."""

    template_fields: Sequence[str] = (*ApprovalOperator.template_fields, "config", "decision")
    template_fields_renderers: ClassVar[dict[str, str]] = {"config": "json", "decision": "json", "body": "md"}
    ui_color = "#fdf3e1"

    def __init__(self, *, config: Any, decision: Any, aws_conn_id: str | None = "aws_default", **kwargs: Any):
        from tagflow.deploy import REJECT

        # The run's form sets the wait (approval_timeout_h) in execute; given here, the provider leaves the task's
        # execution_timeout alone (else it would take that for the wait, and clear it).
        kwargs.setdefault("response_timeout", timedelta(hours=24))
        super().__init__(subject="Deploy the new model?", defaults=REJECT, **kwargs)
        self.config = config
        self.decision = decision
        self.aws_conn_id = aws_conn_id  # the report link's connection, as the gate's extra link uses

    def execute(self, context: Context) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from tagflow import deploy

        gate = self.decision
        if not gate.get("approval_required"):
            why = "the gate keeps the serving model" if not gate.get("deploy") else "approval is auto"
            raise AirflowSkipException(f"nobody is asked: {why}")
        cfg = config_of(self.config)
        candidate = gate["candidate"]
        self.subject = f"Deploy {candidate['job']} to the endpoint {cfg.endpoint_name}?"
        self.body = deploy.approval_body(gate, self._report_url(gate.get("report")))
        self.response_timeout = timedelta(hours=cfg.approval_timeout_h)
        self.log.info("asking for approval of %s (answer within %g h, else it counts as rejected)",
                      candidate["model_data_url"], cfg.approval_timeout_h)  # fmt: skip
        return super().execute(context)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        from tagflow import deploy

        if "error" in event:
            return super().execute_complete(context, event)  # raises, saying what went wrong
        cfg = config_of(self.config)
        answer = deploy.approval_outcome(
            event.get("chosen_options") or [], event.get("responded_by_user"), timeout_h=cfg.approval_timeout_h
        )
        final = deploy.with_approval(self.decision, answer)
        self.log.info("%s", answer["outcome"])
        candidate = self.decision["candidate"]
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {
                "model_data_url": candidate["model_data_url"], "job": candidate["job"],
                **{k: final.get(k) for k in ("metric", "mAP", "baseline", "champion_mAP", "champion", "deploy",
                                             "reason", "evaluation", "approval")},
            }  # fmt: skip
        # Pushed first: on Reject the provider skips choose_deploy, which ends execute_complete (Airflow 3 raises
        # DownstreamTasksSkipped) before a return value is pushed.
        context["ti"].xcom_push(key="return_value", value=answer)
        super().execute_complete(context, event)
        return answer

    def _report_url(self, report: str | None) -> str | None:
        """The report as the gate's extra link opens it (through the API server's S3 view on a local S3 server)."""
        if not report:
            return None
        from tagflow_ops.links import operator_s3_link

        return operator_s3_link(self, report)
