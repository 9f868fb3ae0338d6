"""The data plane's operators: resolve the form, prepare (plan and stage), per shard download and pack, publish."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from tagflow_ops.base import TagflowOperator, bad_input_fails_fast, config_of, run_type_of
from tagflow_ops.links import DatasetLink

if TYPE_CHECKING:
    from airflow.sdk import Context


class ResolveConfigOperator(BaseOperator):
    """Validate the run's params across fields and fill presets; the result is every later task's `config`."""

    def execute(self, context: Context) -> dict[str, Any]:
        from tagflow import jobs, runconfig

        run = context["dag_run"]
        cutoff = runconfig.partition_cutoff(
            run_type_of(run), context.get("data_interval_end"), getattr(run, "run_after", None)
        )
        with bad_input_fails_fast():
            cfg = runconfig.resolve(dict(context["params"]), list_until=cutoff)
            jobs.preflight(cfg)  # hyperparameters and tuning ranges fail here, not after the data plane ran
        self.log.info("run %s: preset %s, %s/%s, dataset %s, list %s (partitions before %s)", run.run_id,
                      cfg.preset, cfg.backend, cfg.mode, cfg.dataset_uri, cfg.list_uri, cfg.list_until)  # fmt: skip
        return cfg.to_dict()


class PrepareDatasetOperator(TagflowOperator):
    """Parse and validate the list, plan shards, stage the plan. Returns the shard indices (what the shard tasks
    map over) and pushes the plan reference under the XCom key `plan`."""

    def run(self, context: Context) -> list[int]:
        from tagflow import pipeline

        ref = pipeline.prepare(config_of(self.config).dataset_spec(), self.aws.s3)
        context["ti"].xcom_push(key="plan", value=ref.to_dict())
        self.log.info("%d images in %d shards; plan %s", ref.num_images, ref.num_shards, ref.plan_uri)
        return list(range(ref.num_shards))


class _ShardOperator(TagflowOperator):
    template_fields: Sequence[str] = ("config", "plan", "shard")

    def __init__(self, *, plan: Any, shard: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.plan = plan
        self.shard = shard

    def _args(self):
        from tagflow import pipeline
        from tagflow.local import usable_cores

        # Use this worker's cores for packing, whatever machine it is.
        spec = config_of(self.config).dataset_spec(pack_workers=usable_cores())
        return spec, pipeline.PlanRef(**self.plan), int(self.shard)


class DownloadShardOperator(_ShardOperator):
    """Fetch one shard's images into one staged tar in S3 (reused when its content digest is already staged)."""

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import pipeline

        spec, ref, index = self._args()
        return pipeline.download_shard(spec, ref, index, self.aws.s3)


class PackShardOperator(_ShardOperator):
    """Pack one staged shard into train/val RecordIO parts, staged in S3 (reused when already packed)."""

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import pipeline

        spec, ref, index = self._args()
        result = pipeline.pack_shard(spec, ref, index, self.aws.s3)
        result.pop("counts", None)
        return result


class PublishDatasetOperator(TagflowOperator):
    """Merge the packed shards into DATASET/{training,validation}/ with the manifest; emits the dataset Asset."""

    operator_extra_links = (DatasetLink(),)

    template_fields: Sequence[str] = ("config", "plan")

    def __init__(self, *, plan: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.plan = plan

    def run(self, context: Context) -> dict[str, Any]:
        from tagflow import manifest, pipeline

        cfg = config_of(self.config)
        summary = pipeline.publish(
            cfg.dataset_spec(), pipeline.PlanRef(**self.plan), self.aws.s3, code_revision=manifest.code_revision()
        )
        for outlet in self.outlets:
            context["outlet_events"][outlet].extra = {"dataset_uri": summary["dataset"], **summary["counts"]}
        self.log.info("published %s: %s (%d bad objects skipped)", summary["dataset"], summary["counts"],
                      summary["errors"])  # fmt: skip
        return {"dataset": summary["dataset"], "counts": summary["counts"], "errors": summary["errors"]}
