"""Two builds of one workflow type, for tests/test_pinned_versions.py (its own module: the sandbox
re-imports workflow modules, which it cannot do for a test module)."""

from __future__ import annotations

from temporalio import workflow


@workflow.defn(name="PinnedDemo")
class BuildOne:
    def __init__(self) -> None:
        self.go = False

    @workflow.signal
    def proceed(self) -> None:
        self.go = True

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.go)
        return "build-1"


@workflow.defn(name="PinnedDemo")
class BuildTwo:
    """Issues a command build one never did: a run started on build one would not replay on it."""

    def __init__(self) -> None:
        self.go = False

    @workflow.signal
    def proceed(self) -> None:
        self.go = True

    @workflow.run
    async def run(self) -> str:
        await workflow.sleep(0.01)
        await workflow.wait_condition(lambda: self.go)
        return "build-2"
