"""Stats for apps and the operator, and the operator's maintenance route.

Owns who sees what: an app sees its own calls, queue and contexts, never another app's or the engine's global figures
(which would tell it how busy other apps are); the operator (the Unix socket without a key, see state.is_operator)
sees the engine's figures and every app's. Ignores how the figures are counted (the engine).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from llmaas.records import App
from llmaas.service.state import ServiceState, app_or_operator, get_state, operator_only

router = APIRouter(prefix="/v1", tags=["stats"])


@router.get("/stats", summary="The app's own calls, queue, contexts and recent calls (the operator: the engine's)")
def stats(app: App | None = Depends(app_or_operator), state: ServiceState = Depends(get_state)) -> dict:
    engine = state.engine
    if app is None:
        return {"engine": engine.stats(),
                "apps": {a.name: {"contexts": n, **engine.app_stats(a)} for a, n in state.catalog.list_apps()}}
    usage = engine.residency()
    contexts = []
    for ctx in state.catalog.list_contexts(app.id):
        r = usage.get(ctx.id)
        contexts.append({"id": ctx.id, "num_tokens": len(ctx.token_ids), "resident_bytes": r.resident_bytes if r else 0,
                         "cached_tokens": r.cached_tokens if r else 0, "busy": bool(r and r.busy)})
    return {"app": {"name": app.name, **engine.app_stats(app)}, "contexts": contexts,
            "recent_calls": list(state.recent_calls[app.id])}


@router.post("/admin/sweep", summary="Operator: drop the KV of contexts the catalogue no longer holds",
             description="`llmaas apps remove` calls it after removing an app while the service runs, so the app's KV "
                         "leaves memory and disk at once rather than at the next start.",
             dependencies=[Depends(operator_only)])
def sweep(state: ServiceState = Depends(get_state)) -> dict:
    return {"dropped_contexts": state.engine.forget_removed()}
