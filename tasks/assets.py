"""Record what each stage made as Prefect assets, so the Event Feed (and an Assets page, where
the UI has one) draws the lineage: registry packages and user files -> datasets -> SFT checkpoint
-> RM checkpoint -> rollouts -> PPO / DPO checkpoints.

Asset keys are the artifact ids (``mindrlhf://<kind>/<sha256>``): a new version is a new asset,
named ``<name>@<short id>`` with its kind, rows and headline figure. Every artifact a stage made --
its outputs and, below them, what it wrote on the way (a PPO stage's rollouts and metrics) -- is
declared with exactly its own parents upstream (and, for a recipe's text tables, exactly the
registry packages that recipe read). A cached stage made nothing: it re-emits nothing.

The events are Prefect's own (``prefect.asset.materialization.succeeded`` with the upstream
assets as related resources, ``prefect.asset.referenced`` for each upstream), emitted by one
``<stage>-assets`` task that runs after its stage. They are emitted here rather than through
``@materialize``, which adds to every materialization the assets of whatever its task waited for
(Prefect's inferred lineage): on a 3.9 server that intermittently gave a stage-level table its
sibling tables as parents (issue #16). Here the upstream of an asset is its manifest's parents
and nothing else."""

from __future__ import annotations

from prefect import task
from prefect.assets import Asset, AssetProperties
from prefect.cache_policies import NO_CACHE
from prefect.context import AssetContext
from prefect.events import emit_event

from mindrlhf.data import registry
from mindrlhf.data.store import ArtifactStore
from mindrlhf.lineage import _headline


def artifact_asset(store: ArtifactStore, art_id: str) -> Asset:
    a = store.get(art_id, verify=False)
    figure = _headline(a)
    desc = f"{a.kind} {a.name}" + (f", {figure}" if figure else "") + f", store {store.root}"
    return Asset(
        key=f"mindrlhf://{a.kind}/{a.id}",
        properties=AssetProperties(name=f"{a.name}@{a.id[:8]}", description=desc),
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


def file_asset(f: dict) -> Asset:
    return Asset(
        key=f"file://sha256/{f['sha256']}",
        properties=AssetProperties(
            name=f"{f.get('name', 'file')}@{f['sha256'][:8]}",
            description=f"{f.get('bytes', 0)} bytes",
        ),
    )


def made_by_stage(store: ArtifactStore, outputs: dict, inputs: dict) -> list:
    """The stage's outputs and every artifact below them that is not one of its inputs."""
    stop = {i for i in inputs.values() if isinstance(i, str)}
    made, queue = {}, [i for i in outputs.values() if isinstance(i, str) and store.exists(i)]
    while queue:
        a = store.get(queue.pop(), verify=False)
        if a.id in made or a.id in stop:
            continue
        made[a.id] = a
        queue += [p for p in a.parents if store.exists(p)]
    return list(made.values())


def upstream(store: ArtifactStore, a) -> list[Asset]:
    deps = [artifact_asset(store, p) for p in a.parents if store.exists(p)]
    deps += [source_asset(k) for k in (a.meta.get("sources") or {}) if k in registry.PINS]
    deps += [file_asset(f) for f in (a.meta.get("source") or {}).get("files", [])]
    return deps


def emit_materialization(asset: Asset, deps: list[Asset], by: str = "mindrlhf") -> None:
    """One asset's materialization event, its upstream exactly ``deps`` (as Prefect writes it)."""
    for d in deps:
        emit_event(
            "prefect.asset.referenced", resource=AssetContext.asset_as_resource(d), related=[]
        )
    emit_event(
        "prefect.asset.materialization.succeeded",
        resource=AssetContext.asset_as_resource(asset),
        related=[AssetContext.asset_as_related(d) for d in deps]
        + [AssetContext.related_materialized_by(by)],
    )


@task(cache_policy=NO_CACHE)  # an event per run that made something: never a cached no-op
def declare_assets(made: list[tuple[Asset, list[Asset]]]) -> None:
    """The materialization events of what a stage made: (asset, its upstream) pairs. It returns
    nothing: Prefect links a later task to an earlier one whose result object it is passed (by
    object identity), and a returned list of keys gave later asset tasks spurious parents."""
    for asset, deps in made:
        emit_materialization(asset, deps)


def record_lineage(
    stage: str,
    store_root: str,
    outputs: dict,
    inputs: dict,
    after=None,
    cached: bool = False,
) -> None:
    """Declare what the stage made, each artifact with its own upstream, in one ``<stage>-assets``
    task after the stage task (it hangs off its stage in the run graph)."""
    if cached:
        return
    store = ArtifactStore(store_root)
    made = [
        (artifact_asset(store, a.id), upstream(store, a))
        for a in made_by_stage(store, outputs, inputs)
    ]
    if made:
        declare_assets.with_options(name=f"{stage}-assets")(
            made, wait_for=[after] if after is not None else None
        )


def run_artifact_key(prefix: str, name: str) -> str:
    """A Prefect artifact key per config (``lineage-demo``): keys allow only a-z, 0-9 and '-'."""
    import re

    return f"{prefix}-" + re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def publish_lineage(name: str, store_root: str, refs: list[str]) -> str:
    """The run's lineage picture (every final output and what it descends from) as a Prefect
    artifact under a stable key per config, ``lineage-<name>``: the newest run's is one click from
    the Artifacts page. Returns the SVG."""
    import base64

    from prefect.artifacts import create_markdown_artifact

    from mindrlhf import lineage

    store = ArtifactStore(store_root)
    nodes = lineage.graph(store, [r for r in refs if store.exists(r)])
    svg = lineage.to_svg(nodes, f"lineage of this run of {name}")
    img = base64.b64encode(svg.encode()).decode()
    finals = "\n".join(
        f"| `{store.get(r, verify=False).name}` | `{r[:16]}` |" for r in refs if store.exists(r)
    )
    md = (
        f"## Lineage\n\n![lineage](data:image/svg+xml;base64,{img})\n\n| output | artifact id |\n"
        f"|---|---|\n{finals}\n\n"
        "`mindrlhf lineage <id> --format svg|dot|json` gives the same picture.\n"
    )
    key = run_artifact_key("lineage", name)
    create_markdown_artifact(
        key=key, markdown=md, description=f"lineage of the newest run of {name}"
    )
    return svg
