"""`POST /v1/elastic/choose`: ElastiLM's multiple-choice form, so that an app (or an evaluation) gets the most accurate
answer its SLO allows through the real service path.

Owns the translation between the request body and an engine call (through the fair queue, on the compute thread)
and the reply: the chosen index, every choice's score and the `llmaas` object of what ElastiLM chose. Ignores the
decision itself (elastic/runtime.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from llmaas.engine.calls import ChooseCall
from llmaas.records import App
from llmaas.service.openai_api import slo_request
from llmaas.service.schemas import ChooseBody, ChooseOut
from llmaas.service.state import CallStream, ServiceState, authenticate, get_state

router = APIRouter(prefix="/v1/elastic", tags=["elastic"])


@router.post("/choose", response_model=ChooseOut,
             summary="Pick one of several choices within a latency SLO (ElastiLM, log-likelihood scoring)")
async def choose(body: ChooseBody, request: Request, app: App = Depends(authenticate),
                 state: ServiceState = Depends(get_state)) -> ChooseOut:
    call = ChooseCall(app, body.context, body.question, tuple(body.choices), slo_request(body.slo))
    r = await CallStream(state, call, request).choice()
    return ChooseOut(choice=r.choice, scores=list(r.scores), usage={"prompt_tokens": r.prompt_tokens},
                     llmaas={**r.elastic, "timings": {"queue_s": r.queue_s, "total_s": r.total_s}})
