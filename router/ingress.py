"""The OpenAI-compatible ingress: validate, translate, batch across adapters, stream back.

Every completion becomes one ReplicaRequest per (prompt, choice), and router.replica_dispatch
sends them to the replicas in `@serve.batch` groups, whatever their adapters; the routes here
validate, translate to and from the core's types, and stream answers back (SSE). LoRAX's and
vLLM's own routes translate into the same requests.
"""


import asyncio
import time
import uuid
from contextlib import ExitStack, aclosing, contextmanager
from typing import AsyncIterator, Callable, Iterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import AutoConfig, AutoTokenizer

from flora_core.request_output import RequestOutput
from router import lorax_api as lorax
from router import openai_format as fmt
from router.catalog import CatalogSnapshot, newest_snapshot
from router.errors import ApiError, bad_request, overloaded, unknown_model
from router.handle_api import GenerateChunk, GenerateRequest, GenerateResponse, GenerateUsage
from router.http_app import app
from router.messages import AdapterRef, ReplicaRequest
from router.management_routes import AdapterManagementRoutes
from router.metrics import CLIENT_CLOSED, UNKNOWN_ADAPTER, IngressMetrics
from router.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                             ChatDelta, ChatMessageOut, ChatStreamChoice, CompletionRequest, CompletionResponse,
                             DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest,
                             TokenizeResponse)
from router.replica_dispatch import ReplicaDispatch, new_job
from router.settings import IngressSettings

CATALOG_TTL_S = 1.0  # how stale the ingress's copy of the adapter catalog may get
MAX_CHOICES = 64  # n x prompts per request


def _logprob_dicts(items) -> Optional[list]:
    """The handle API's logprobs: per token {token_id, logprob, top: [[id, logprob]]}, None where a token has none."""
    if items is None:
        return None
    return [None if t is None else {"token_id": t.token_id, "logprob": t.logprob, "top": [list(x) for x in t.top]}
            for t in items]


@serve.ingress(app)
class FloraIngress(AdapterManagementRoutes):
    """See the module docstring; the adapter management routes come from AdapterManagementRoutes.
    Deployed by deploy.app.build_app."""

    def __init__(self, settings: IngressSettings, replica: DeploymentHandle, catalog: DeploymentHandle) -> None:
        self.settings = settings
        # Results come back by value over Serve's inter-deployment gRPC (Ray >= 2.54), not as object refs:
        # no object-store round trip per streamed message (README, Performance: 10-20% more tokens/s through HTTP).
        self.replica = replica.options(_by_reference=False)
        self.catalog = catalog
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path, local_files_only=True)
        self.vocab_size = AutoConfig.from_pretrained(settings.model_path).get_text_config().vocab_size
        self.max_prompt_chars = settings.max_prompt_chars or fmt.prompt_chars_bound(self.tokenizer,
                                                                                   settings.max_model_len)
        self._catalog: Optional[CatalogSnapshot] = None
        self._catalog_at = 0.0
        self.metrics = IngressMetrics()
        self.dispatch = ReplicaDispatch(settings, self.replica, self.metrics)

    # ------------------------------------------------------------------ HTTP routes

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        try:
            stats = await asyncio.wait_for(self.replica.stats.remote(), timeout=10)
        except Exception as error:  # not ready yet, or no replica answers
            return overloaded(f"no model replica answered ({type(error).__name__}); retry shortly").response()
        return JSONResponse({"status": "ready", "replica": stats["replica_id"]})

    @app.get("/v1/models")
    async def models(self) -> ModelList:
        snapshot = await self._snapshot(refresh=True)
        base = self.settings.served_model_name
        cards = [ModelCard(id=base, root=base)]
        cards += [ModelCard(id=e.name, root=base, parent=base, kind=e.kind, rank=e.rank)
                  for e in sorted(snapshot.entries.values(), key=lambda e: e.name)]
        return ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        with self._refusals_counted(body.model):
            return await self._completions(body)

    async def _completions(self, body: CompletionRequest):
        prompts = body.prompts()
        fmt.check_counts(body.n, len(prompts), MAX_CHOICES)
        echo_only = body.echo_only
        # echo + logprobs scores the prompt too; vLLM's prompt_logprobs asks for it in its own format
        prompt_logprobs = fmt.prompt_logprobs_param(body, body.logprobs if body.echo else None)
        adapter = await self._adapter_ref(body.model)
        jobs, echoes, prompt_lens = [], [], []
        for prompt in prompts:
            ids = fmt.tokenize_prompt(self.tokenizer, prompt, self.vocab_size, self.max_prompt_chars)
            prompt_lens.append(len(ids))
            echo = (prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)) if body.echo else None
            for _ in range(body.n):
                params = fmt.sampling_params(body, len(ids), self.settings.max_model_len,
                                             self.settings.default_max_tokens, body.logprobs, len(jobs),
                                             prompt_logprobs)
                jobs.append(new_job(ids, params, adapter, whole_answer=not body.stream))
                echoes.append(echo)
        if body.stream:
            return await self._stream_completion(body, jobs, echoes, prompt_lens, echo_only)
        outputs = await self._run_all(jobs, body.model)
        choices = [fmt.completion_choice(self.tokenizer, i, o, echoes[i], body.logprobs, delta=False,
                                         echo_only=echo_only, prompt_logprobs_k=body.prompt_logprobs)
                   for i, o in enumerate(outputs)]
        return CompletionResponse(model=body.model, choices=choices,
                                  usage=fmt.usage_of(outputs, prompt_lens, echo_only))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest):
        with self._refusals_counted(body.model):
            return await self._chat_completions(body)

    async def _chat_completions(self, body: ChatCompletionRequest):
        fmt.check_counts(body.n, 1, MAX_CHOICES)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        adapter = await self._adapter_ref(body.model)
        ids = fmt.chat_prompt_ids(self.tokenizer, body.messages, self.max_prompt_chars)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = fmt.prompt_logprobs_param(body)
        jobs = [new_job(ids, fmt.sampling_params(body, len(ids), self.settings.max_model_len,
                                                   self.settings.default_max_tokens, logprobs, i, prompt_logprobs),
                          adapter, whole_answer=not body.stream)
                for i in range(body.n)]
        if body.stream:
            return await self._stream_chat(body, jobs, len(ids))
        outputs = await self._run_all(jobs, body.model)
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=o.text),
                              logprobs=fmt.chat_logprobs(self.tokenizer, o.logprobs or ()) if body.logprobs else None,
                              finish_reason=fmt._finish(o)) for i, o in enumerate(outputs)]
        scored = None if prompt_logprobs is None else fmt.vllm_prompt_logprobs(self.tokenizer, outputs[0],
                                                                              prompt_logprobs)
        return ChatCompletionResponse(model=body.model, choices=choices, usage=fmt.usage_of(outputs, [len(ids)]),
                                      prompt_logprobs=scored)

    @app.post("/tokenize")
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        await self._adapter_ref(body.model)  # 404 for a name nobody serves, as the other routes
        if body.messages is not None:
            ids = fmt.chat_prompt_ids(self.tokenizer, body.messages, self.max_prompt_chars)
        else:
            ids = fmt.text_prompt_ids(self.tokenizer, body.prompt, self.max_prompt_chars, body.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.settings.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        await self._adapter_ref(body.model)
        fmt.check_token_ids(body.tokens, self.vocab_size, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    @app.post("/generate", openapi_extra=lorax.OPENAPI_BODY)
    async def lorax_generate(self, request: Request):
        """LoRAX's (TGI's) generate: {"inputs", "parameters": {"adapter_id", ...}}."""
        return await self._lorax(request, stream=False)

    @app.post("/generate_stream", openapi_extra=lorax.OPENAPI_BODY)
    async def lorax_generate_stream(self, request: Request):
        return await self._lorax(request, stream=True)

    @app.post("/", openapi_extra=lorax.OPENAPI_BODY)
    async def lorax_client_route(self, request: Request):
        """What `lorax.Client` posts to: the body's `stream` picks the stream, else a list of one answer."""
        return await self._lorax(request, stream=None)

    async def _lorax(self, request: Request, stream: Optional[bool]):
        try:
            body = lorax.parse_request(await request.body())
            model = await self._lorax_model(body.parameters)
            streaming = body.stream if stream is None else stream
            with self._refusals_counted(model):
                job = await self._lorax_job(body, model, streaming)
                if streaming:
                    return await self._stream_lorax(body, job, model)
                (output,) = await self._run_all([job], model)
        except ApiError as error:
            return lorax.error_response(error)
        answer = lorax.response(self.tokenizer, body, output, job.params.seed)
        return JSONResponse([answer] if stream is None else answer)

    async def _lorax_model(self, p: "lorax.LoraxParameters") -> str:
        """The model a LoRAX body names: adapter_id, the served adapter in the folder adapter_id points to
        (adapter_source 'local'), or with no adapter_id the base model."""
        lorax.check_adapter_source(p)
        if p.adapter_source == "local" and p.adapter_id:
            found = await self.catalog.served_at.remote(p.adapter_id)
            if isinstance(found, str):
                raise bad_request(found, "adapter_id")
            return found.name
        return p.adapter_id or self.settings.served_model_name

    async def _lorax_job(self, body: "lorax.LoraxRequest", model: str, streaming: bool) -> ReplicaRequest:
        completion = lorax.completion_body(body, model)
        adapter = await self._adapter_ref(model)
        p = body.parameters
        ids = fmt.tokenize_prompt(self.tokenizer, body.inputs, self.vocab_size, self.max_prompt_chars)
        ids = ids[-p.truncate:] if p.truncate else ids
        tokens_shown = p.details or p.decoder_input_details or streaming  # each shown token has its logprob
        logprobs = (p.return_k_alternatives or 0) if tokens_shown else None
        params = fmt.sampling_params(completion, len(ids), self.settings.max_model_len,
                                     self.settings.default_max_tokens, logprobs, 0,
                                     0 if p.decoder_input_details else None)
        return new_job(ids, params, adapter, whole_answer=not streaming)

    async def _stream_lorax(self, body: "lorax.LoraxRequest", job: ReplicaRequest, model: str) -> StreamingResponse:
        admission, started = await self.dispatch.start_streams([job])
        finals = {}

        async def chunks() -> AsyncIterator[str]:
            async with aclosing(self.dispatch.merged(started)) as merged:
                async for index, output in merged:
                    for event in lorax.stream_events(self.tokenizer, body, output, job.params.seed):
                        yield fmt.sse(event)
                    if output.finished:
                        finals[index] = output

        return self._sse_response(model, admission, chunks(), finals, done=None,
                                  error_event=lambda error: fmt.sse(lorax.error_body(error)))

    # ------------------------------------------------------------------ Python handle API

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """One request, whole answer; ValueError names the bad field, UnknownAdapter-style 404s as KeyError."""
        job, adapter_name = await self._handle_job(request, whole_answer=True)
        output = (await self._run_all([job], adapter_name))[0]
        return GenerateResponse(adapter=request.adapter, text=output.text, token_ids=list(output.token_ids),
                                finish_reason=fmt._finish(output), logprobs=_logprob_dicts(output.logprobs),
                                prompt_logprobs=_logprob_dicts(output.prompt_logprobs),
                                usage=GenerateUsage(prompt_tokens=output.usage.prompt_tokens,
                                                    completion_tokens=output.usage.completion_tokens),
                                time_to_first_token_s=output.timings.time_to_first_token)

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        job, adapter_name = await self._handle_job(request, whole_answer=False)
        with self.dispatch.admitted(1):
            async for output in self.dispatch.outputs(job):
                yield GenerateChunk(delta_text=output.delta_text, delta_token_ids=list(output.delta_token_ids),
                                    finish_reason=fmt._finish(output) if output.finished else None)

    async def replica_stats(self) -> list[dict]:
        """Engine and pool counters of every replica this ingress has dispatched to (for operators)."""
        replicas = sorted(self.dispatch.seen_replicas)
        return list(await asyncio.gather(*(self.replica.stats.remote(target_replica=r) for r in replicas)))

    async def _handle_job(self, request: GenerateRequest, whole_answer: bool) -> tuple[ReplicaRequest, str]:
        name = request.adapter or self.settings.served_model_name
        sampling = request.model_dump(exclude={"adapter", "logprobs", "prompt_logprobs", "stop", "stop_token_ids"})
        body = CompletionRequest(model=name, stop=request.stop or None, stop_token_ids=request.stop_token_ids or None,
                                 **sampling)
        try:
            adapter = await self._adapter_ref(name)
            ids = fmt.tokenize_prompt(self.tokenizer, request.prompt, self.vocab_size, self.max_prompt_chars)
            params = fmt.sampling_params(body, len(ids), self.settings.max_model_len,
                                         self.settings.default_max_tokens, request.logprobs, 0,
                                         request.prompt_logprobs)
        except ApiError as error:
            if error.status == 404:
                raise KeyError(error.message) from None
            raise ValueError(f"GenerateRequest.{error.param or 'body'}: {error.message}") from None
        return new_job(ids, params, adapter, whole_answer), name

    # ------------------------------------------------------------------ running and streaming

    async def _run_all(self, jobs: list[ReplicaRequest], model: str) -> list[RequestOutput]:
        """Every job's last output, counted in flora_requests_total under `model`."""
        outputs = await self.dispatch.run_all(jobs)
        self.metrics.record_request(self._metric_adapter(model), 200, outputs)
        return outputs

    async def _stream_completion(self, body: CompletionRequest, jobs, echoes, prompt_lens, echo_only: bool):
        admission, started = await self.dispatch.start_streams(jobs)
        completion_id, finals = f"cmpl-{uuid.uuid4().hex}", {}

        async def chunks() -> AsyncIterator[str]:
            sent_echo = set()
            async with aclosing(self.dispatch.merged(started)) as merged:
                async for index, output in merged:
                    # the prompt goes in a choice's first chunk only
                    echo = echoes[index] if index not in sent_echo else None
                    sent_echo.add(index)
                    choice = fmt.completion_choice(self.tokenizer, index, output, echo, body.logprobs, delta=True,
                                                   echo_only=echo_only)
                    yield fmt.sse(CompletionResponse(id=completion_id, model=body.model, choices=[choice]))
                    if output.finished:
                        finals[index] = output
            if body.stream_options and body.stream_options.include_usage:
                usage = fmt.usage_of(list(finals.values()), prompt_lens, echo_only)
                yield fmt.sse(CompletionResponse(id=completion_id, model=body.model, choices=[], usage=usage))

        return self._sse_response(body.model, admission, chunks(), finals)

    async def _stream_chat(self, body: ChatCompletionRequest, jobs, prompt_len: int):
        admission, started = await self.dispatch.start_streams(jobs)
        chat_id, finals = f"chatcmpl-{uuid.uuid4().hex}", {}

        def chunk(choices, usage=None) -> str:
            return fmt.sse(ChatCompletionChunk(id=chat_id, model=body.model, choices=choices, usage=usage))

        async def chunks() -> AsyncIterator[str]:
            yield chunk([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                         for i in range(len(jobs))])
            async with aclosing(self.dispatch.merged(started)) as merged:
                async for index, output in merged:
                    logprobs = fmt.chat_logprobs(self.tokenizer, output.delta_logprobs or ()) if body.logprobs else None
                    finish = fmt._finish(output) if output.finished else None
                    yield chunk([ChatStreamChoice(index=index, delta=ChatDelta(content=output.delta_text),
                                                  logprobs=logprobs, finish_reason=finish)])
                    if output.finished:
                        finals[index] = output
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], fmt.usage_of(list(finals.values()), [prompt_len]))

        return self._sse_response(body.model, admission, chunks(), finals)

    def _sse_response(self, model: str, admission: ExitStack, chunks: AsyncIterator[str],
                      finals: dict[int, RequestOutput], done: Optional[str] = fmt.SSE_DONE,
                      error_event: Callable[[ApiError], str] = fmt.error_event) -> StreamingResponse:
        """Stream `chunks` (SSE strings), then `done` (OpenAI's [DONE]; None: nothing); an ApiError
        mid-stream becomes an error_event.

        However the stream ends (done, failed, or the client gone), the admission is released and
        the request is counted under the status it ended with.
        """
        async def events() -> AsyncIterator[str]:
            status = CLIENT_CLOSED
            try:
                async for event in chunks:
                    yield event
                status = 200
                if done:
                    yield done
            except ApiError as error:
                status = error.status
                yield error_event(error)
                if done:
                    yield done
            finally:
                admission.close()
                self.metrics.record_request(self._metric_adapter(model), status, finals.values())
                await chunks.aclose()  # closes its replica streams now (aclosing), not when garbage-collected

        return StreamingResponse(events(), media_type="text/event-stream")

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _refusals_counted(self, model: str) -> Iterator[None]:
        """Count a request refused before its answer starts (a 4xx or 503) in flora_requests_total."""
        try:
            yield
        except ApiError as error:
            self.metrics.record_request(self._metric_adapter(model), error.status)
            raise

    def _metric_adapter(self, model: str) -> str:
        """The adapter tag: the name if it is served, else UNKNOWN_ADAPTER (clients pick `model`)."""
        model = self._adapter_name(model)
        served = model == self.settings.served_model_name or (self._catalog and model in self._catalog.entries)
        return model if served else UNKNOWN_ADAPTER

    def _adapter_name(self, model: str) -> str:
        """`model` without the "<base model>:" prefix that Ray Serve LLM's multi-LoRA ids carry."""
        prefix = f"{self.settings.served_model_name}:"
        return model[len(prefix):] if model.startswith(prefix) else model

    async def _snapshot(self, refresh: bool = False) -> CatalogSnapshot:
        if refresh or self._catalog is None or time.monotonic() - self._catalog_at > CATALOG_TTL_S:
            self._catalog = newest_snapshot(self._catalog, await self.catalog.snapshot.remote())
            self._catalog_at = time.monotonic()
        return self._catalog

    async def _adapter_ref(self, model: str) -> Optional[AdapterRef]:
        model = self._adapter_name(model)
        if model == self.settings.served_model_name:
            return None
        entry = (await self._snapshot()).entries.get(model)
        if entry is None:  # maybe loaded a moment ago through another ingress replica
            entry = (await self._snapshot(refresh=True)).entries.get(model)
        if entry is None:
            raise unknown_model(model, f"Use {self.settings.served_model_name!r} for the base model; "
                                       "GET /v1/models lists the adapters.")
        return entry.ref
