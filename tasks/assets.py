"""Record each stage's outputs as Prefect assets so the UI draws the lineage graph
(registry packages -> datasets -> SFT checkpoint -> RM checkpoint -> PPO / DPO checkpoints).

Asset keys are the artifact ids (``mindrlhf://<kind>/<sha256>``): a new version is a new asset.
The ids are only known once a stage has run, so after each stage task the flow runs a small
materializing task declaring the stage's outputs as assets and its inputs as their upstream."""

from __future__ import annotations

from prefect.assets import Asset, AssetProperties, materialize

from mindrlhf.data import registry
from mindrlhf.data.store import ArtifactStore


def artifact_asset(store: ArtifactStore, art_id: str) -> Asset:
    a = store.get(art_id, verify=False)
    rows = a.manifest.get("num_rows")
    desc = (
        f"{a.kind} {a.name}"
        + (f", {rows} rows" if rows is not None else "")
        + f", store {store.root}"
    )
    return Asset(
        key=f"mindrlhf://{a.kind}/{a.id}", properties=AssetProperties(name=a.name, description=desc)
    )


def source_asset(pin_key: str) -> Asset:
    pin = registry.PINS[pin_key]
    client = "npm" if pin.client == "npm" else "pypi"
    name, version = pin.spec.replace("==", "@").split("@")
    return Asset(
        key=f"{client}://{name}/{version}",
        properties=AssetProperties(
            name=pin.spec, description=f"{pin.filename} sha256 {pin.sha256}"
        ),
    )


def record_lineage(
    stage: str, store_root: str, outputs: dict, inputs: dict, sources: list[str] = ()
) -> None:
    store = ArtifactStore(store_root)
    outs = [
        artifact_asset(store, i) for i in outputs.values() if isinstance(i, str) and store.exists(i)
    ]
    deps = [
        artifact_asset(store, i) for i in inputs.values() if isinstance(i, str) and store.exists(i)
    ]
    deps += [source_asset(k) for k in sources]
    if not outs:
        return

    @materialize(*outs, asset_deps=deps or None, by="mindrlhf", name=f"{stage}-assets")
    def declare() -> list[str]:
        return [a.key for a in outs]

    declare()
