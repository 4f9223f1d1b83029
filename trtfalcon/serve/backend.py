"""What runs behind the generated model.py: Triton requests in, the LLMEngine in the middle, responses out.

Threads. The LLMEngine is single-threaded, so one engine thread owns it: it admits new requests, polls for
cancellations, calls step(), and sends each step's tokens back through the requests' response senders. Triton
calls `execute` on its own thread; execute only validates and queues (it never touches the engine and never
blocks on generation), so requests arriving during a long step join the very next step: in-flight batching
across Triton requests.

Every request ends exactly once with TRITONSERVER_RESPONSE_COMPLETE_FINAL, on exactly one of these paths:
- rejected in execute (missing input, wrong dtype or shape, ids outside the vocab, too long, bad sampling
  params): an error response, FINAL, before it reaches the engine;
- its last token ("length", "stop" or DeepConf's "confidence" from the engine, or a stop word found in the text):
  FINAL with that token;
- rejected by the engine's own admission checks (e.g. it needs more KV blocks than the pool has): INVALID_ARG;
- ended by the engine with an error (its step's executor call failed), or by a failure while building or sending
  its response: an error response, FINAL;
- cancelled by the client (the sender's is_cancelled()): engine.cancel frees its KV blocks and state slot at
  once; a CANCELLED error response, FINAL;
- the instance unloads (finalize) or the engine loop itself fails: an UNAVAILABLE / INTERNAL error, FINAL.
Each ending is counted by outcome, and the instance's pools are published, on Triton's metrics port (metrics.py).
`_live` maps the engine's request id to the request's state; whoever pops it sends the FINAL flag, so a late
delta for a request that already ended (its stop word was found, or it was failed) is ignored.

n samples (input `n` > 1, DeepConf's parallel traces): the engine runs them as n sequences (ids rid/k, the prompt
prefilled once); each has its own _Live entry, all sharing one _Request. Every response carries one sample
(output sample_index); each sample ends on its own, and the FINAL flag rides on the response of the last sample
to end. An error or a cancellation of any sample ends the whole Triton request (one error response, FINAL) and
cancels its other samples. DeepConf's per-sample confidence stats (lowest_group_confidence, and confidences with
return_confidences) ride on the same responses.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trtfalcon.errors import RequestError
from trtfalcon.runtime.request import Request, RequestOutput, StreamDelta, TokenLogprobs
from trtfalcon.serve.metrics import OUTCOME_OF_CODE, PoolStats, ServeMetrics
from trtfalcon.serve.repository import ServeSettings, instance_runtime_options
from trtfalcon.serve.requests import ParsedRequest, parse_request, serve_limits
from trtfalcon.serve.text import TextStream, ThreadLocalTokenizer, load_tokenizer

log = logging.getLogger("trtfalcon.serve")


@dataclass
class _Request:
    """One Triton request: its sender and the engine ids of its samples still in flight."""

    sender: Any
    samples: set[str]


@dataclass
class _Live:
    """One sample of a request in flight: where its responses go and what it has produced so far."""

    triton_id: str
    sender: Any
    parsed: ParsedRequest
    text: TextStream | None
    token_ids: list[int] = field(default_factory=list)  # all generated ids (count; non-streaming output)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # non-streaming only
    request: _Request | None = None  # set at admission
    sample_index: int = 0
    output: RequestOutput | None = None  # the engine's live output (confidences, lowest group)


class ServedModel:
    """One Triton model instance: an engine on one device, its thread, and the request bookkeeping.

    `pb` is the triton_python_backend_utils module (passed in, so that this file imports without Triton and the
    tests can drive it through a stand-in).
    """

    def __init__(self, pb: Any, settings: ServeSettings, version_dir: str | Path, device: str = "cpu",
                 name: str = "trtfalcon", instance: str = "") -> None:
        from trtfalcon.runtime.llm import LLMEngine

        self.pb = pb
        self.name = name
        self.settings = settings
        opts = instance_runtime_options(settings.runtime, device)
        model_dir = settings.resolve(version_dir, "model_dir")
        self.engine = LLMEngine.from_options(settings.backend, model_dir, opts, seed=settings.seed, stream=True,
                                             log_steps=False)
        cfg = self.config = self.engine.config
        # An executor built for fixed limits (a TensorRT engine's optimization profile) may serve less than the
        # options ask; the engine's scheduler and the request checks must use what it can actually run.
        lim = self.engine.limits
        max_batch_size, max_num_tokens, max_seq_len = lim.max_batch_size, lim.max_num_tokens, lim.max_seq_len
        tok_dir = settings.resolve(version_dir, "tokenizer_dir")
        # Triton's thread encodes while the engine thread decodes: each thread gets its own tokenizer.
        self.tokenizer = (ThreadLocalTokenizer(tok_dir, first=load_tokenizer(tok_dir))
                          if tok_dir is not None else None)
        self.limits = serve_limits(settings.limits, vocab_size=cfg.vocab_size, max_seq_len=max_seq_len)
        self.metrics = ServeMetrics(pb, {"model": name, "version": Path(version_dir).name,
                                         "instance": instance or f"{name}_{device}"})
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._inbox: list[tuple[Request, _Live]] = []  # guarded by _cv; everything below is the engine thread's
        self._stopping = False
        self._live: dict[str, _Live] = {}
        self._last_cancel_poll = 0.0
        self._thread = threading.Thread(target=self._run, name=f"trtfalcon-engine-{name}", daemon=True)
        self._thread.start()
        log.info("%s: %s backend on %s, max_batch_size %d, max_num_tokens %d, max_seq_len %d, tokenizer %s", name,
                 settings.backend, device, max_batch_size, max_num_tokens, max_seq_len, tok_dir or "none")

    @classmethod
    def from_triton_args(cls, pb: Any, args: dict[str, str]) -> ServedModel:
        """Build from the `args` of TritonPythonModel.initialize (model_config JSON, repository, version, device)."""
        config = json.loads(args["model_config"])
        name = config.get("name", "trtfalcon")
        if not config.get("model_transaction_policy", {}).get("decoupled", False):
            raise RuntimeError(f"{name}/config.pbtxt: model_transaction_policy: expected decoupled: true (token "
                               "streaming), found a non-decoupled model")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        kind = args.get("model_instance_kind", "CPU")
        device = f"cuda:{int(args.get('model_instance_device_id', 0))}" if kind == "GPU" else "cpu"
        return cls(pb, ServeSettings.load(version_dir), version_dir, device, name,
                   args.get("model_instance_name", ""))

    # ---- Triton's thread --------------------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        """Validate and queue each request; answer bad ones at once. Never blocks on generation."""
        for request in requests:
            sender = request.get_response_sender()
            triton_id = request.request_id() or ""
            try:
                parsed = parse_request(lambda n, r=request: self._input(r, n), self.limits, self.tokenizer,
                                       _parameters(request))
            except RequestError as e:
                self._send_error(sender, f"{self._label(triton_id)}: {e}", "INVALID_ARG")
                continue
            except Exception as e:  # noqa: BLE001 - e.g. the tokenizer failed on this text: this request only
                self._send_error(sender, f"{self._label(triton_id)}: {type(e).__name__}: {e}", "INTERNAL")
                continue
            rid = f"{triton_id or 'request'}#{next(self._ids)}"  # unique in the engine even if clients reuse ids
            text = TextStream(self.tokenizer, parsed.prompt_ids, parsed.stop_words) if self.tokenizer else None
            live = _Live(triton_id, sender, parsed, text)
            with self._cv:
                if self._stopping:
                    self._send_error(sender, f"{self._label(triton_id)}: model instance is unloading",
                                     "UNAVAILABLE")
                    continue
                self._inbox.append((Request(rid, parsed.prompt_ids, parsed.params), live))
                self._cv.notify()
        if self.metrics.pending:
            with self._cv:
                self._cv.notify()  # rejections to publish: the engine thread may be idle
        return None

    def finalize(self, timeout_s: float = 30.0) -> None:
        """Stop the engine thread; every request still in flight ends with an UNAVAILABLE error."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("%s: engine thread did not stop within %.0f s (a step is hung)", self.name, timeout_s)
        self.metrics.close()

    def _input(self, request: Any, name: str) -> np.ndarray | None:
        t = self.pb.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    def _label(self, triton_id: str) -> str:
        return f"{self.name}: request {triton_id!r}" if triton_id else f"{self.name}: request"

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        self._publish(force=True)  # the pools' sizes, before the first request
        while True:
            with self._cv:
                while not self._inbox and not engine.has_work and not self._stopping:
                    if self.metrics.pending:
                        break  # publish what execute() counted, then wait
                    self._cv.wait()
                if self._stopping:
                    break
                new, self._inbox = self._inbox, []
            for request, live in new:  # one request's failure must not strand the others of this batch
                try:
                    self._admit(request, live)
                except Exception as e:  # noqa: BLE001
                    log.error("%s: admitting %s failed:\n%s", self.name, request.request_id, traceback.format_exc())
                    self._live.pop(request.request_id, None)
                    self._send_error(live.sender, f"{self._label(live.triton_id)}: admission failed: "
                                                  f"{type(e).__name__}: {e}", "INTERNAL")
            try:
                self._poll_cancelled()
                if engine.has_work:
                    for d in engine.step():
                        self._deliver(d)
            except Exception as e:  # noqa: BLE001 - the engine's state is unknown: end what it holds, keep serving
                log.error("%s: engine step failed:\n%s", self.name, traceback.format_exc())
                self._end_all(f"engine step failed: {type(e).__name__}: {e}", "INTERNAL")
            self._publish(force=not engine.has_work)
        with self._cv:
            pending, self._inbox = self._inbox, []
        for request, live in pending:
            self._live[request.request_id] = live  # never added to the engine: cancel() below finds nothing
        self._end_all("model instance is unloading", "UNAVAILABLE")

    def _publish(self, force: bool) -> None:
        try:
            self.metrics.publish(self._requests_in_flight(), self.pool_stats(), force=force)
        except Exception:  # noqa: BLE001 - metrics are for operators: never let them end requests
            log.error("%s: publishing metrics failed:\n%s", self.name, traceback.format_exc())

    def _requests_in_flight(self) -> int:
        """Triton requests in flight (a request with n samples is one)."""
        return len({id(live.request) if live.request is not None else id(live) for live in self._live.values()})

    def pool_stats(self) -> PoolStats:
        """Free and total KV blocks and state slots of this instance's engine (engine thread)."""
        sched = self.engine.scheduler
        spec = self.engine.executor.cache_spec
        return PoolStats(sched.blocks.num_free, spec.num_blocks, sched.slots.num_free, spec.num_slots)

    def _admit(self, request: Request, live: _Live) -> None:
        outs = self.engine.add_samples(request)
        if outs[0].finished:  # rejected by the scheduler's own checks (e.g. more KV blocks than the pool has): a
            # client error like those execute() catches; the engine's matching delta next step finds no _live entry
            self._send_error(live.sender, f"{self._label(live.triton_id)}: {outs[0].error}", "INVALID_ARG")
            return
        group = _Request(live.sender, {o.request_id for o in outs})
        for k, out in enumerate(outs):
            sample = live if k == 0 else _Live(
                live.triton_id, live.sender, live.parsed,
                TextStream(self.tokenizer, live.parsed.prompt_ids, live.parsed.stop_words) if live.text else None)
            sample.request, sample.sample_index, sample.output = group, k, out
            self._live[out.request_id] = sample

    def _poll_cancelled(self) -> None:
        """Ask Triton which requests were cancelled (each ask is an IPC round trip: at most every cancel_poll_s)."""
        now = time.monotonic()
        if now - self._last_cancel_poll < self.settings.cancel_poll_s:
            return
        self._last_cancel_poll = now
        for rid, live in list(self._live.items()):
            is_cancelled = getattr(live.sender, "is_cancelled", None)  # Triton >= 23.10
            try:
                cancelled = is_cancelled is not None and is_cancelled()
            except Exception:  # noqa: BLE001 - a sender we cannot ask belongs to a client that is gone
                log.error("%s: is_cancelled() failed for %s:\n%s", self.name, rid, traceback.format_exc())
                cancelled = True
            if cancelled:
                self.engine.cancel(rid)  # frees its blocks and slot now; its "cancelled" delta ends it next step

    def _end_all(self, message: str, code: str) -> None:
        for rid, live in list(self._live.items()):
            if rid not in self._live:  # a sibling's error already ended its request
                continue
            try:
                self.engine.cancel(rid)
            except Exception:  # noqa: BLE001 - best effort on an engine that just failed
                pass
            del self._live[rid]
            self._end_siblings(live)
            self._send_error(live.sender, f"{self._label(live.triton_id)}: {message}", code)

    def _end_siblings(self, live: _Live) -> None:
        """`live`'s request ends now (an error or a cancellation): its other samples still in flight are cancelled
        in the engine (their blocks and slots free at once) and forgotten, so they send nothing more."""
        group = live.request
        if group is None:
            return
        for rid in list(group.samples):
            sibling = self._live.pop(rid, None)
            if sibling is not None and sibling is not live:
                self.engine.cancel(rid)
        group.samples.clear()

    def _sample_done(self, rid: str, live: _Live) -> bool:
        """`live` (sample `rid`) sent its last response: True when it was its request's last sample (FINAL)."""
        del self._live[rid]
        group = live.request
        if group is None:
            return True
        group.samples.discard(rid)
        return not group.samples

    def _deliver(self, d: StreamDelta) -> None:
        live = self._live.get(d.request_id)
        if live is None:  # already ended by us (stop word, failure): the engine's late delta is not news
            return
        try:
            self._respond(d, live)
        except Exception as e:  # noqa: BLE001 - e.g. the detokenizer or a send failed: this request only
            log.error("%s: response for %s failed:\n%s", self.name, d.request_id, traceback.format_exc())
            if self._live.pop(d.request_id, None) is not None:
                if not d.finished:
                    self.engine.cancel(d.request_id)
                self._end_siblings(live)
                self._send_error(live.sender, f"{self._label(live.triton_id)}: {type(e).__name__}: {e}", "INTERNAL")
            else:  # its final response was built but could not be sent (the client is gone)
                self.metrics.request_ended("failed")

    def _respond(self, d: StreamDelta, live: _Live) -> None:
        reason = d.finish_reason
        if reason in ("error", "cancelled"):
            del self._live[d.request_id]
            self._end_siblings(live)
            if reason == "error":
                err = d.output.error if d.output is not None else "ended with an error"
                self._send_error(live.sender, f"{self._label(live.triton_id)}: {err}", "INTERNAL")
            else:
                self._send_error(live.sender, f"{self._label(live.triton_id)}: cancelled", "CANCELLED")
            return
        live.token_ids.extend(d.token_ids)
        self.metrics.tokens_generated(len(d.token_ids))
        if live.text is not None:
            live.text.add(d.token_ids)
            if live.text.stopped and reason != "stop":
                if reason is None:
                    self.engine.cancel(d.request_id)  # a stop word ended the text: free its blocks and slot now
                reason = "stop"
        if not live.parsed.stream:
            if live.parsed.params.logprobs and d.logprobs:
                live.logprobs.extend(d.logprobs)
            if reason is None:
                return
            ids, lps = live.token_ids, live.logprobs
        else:
            ids, lps = list(d.token_ids), list(d.logprobs or [])
        done = reason is not None
        final = done and self._sample_done(d.request_id, live)
        tensors = self._outputs(live, ids, lps, reason or "", done)
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        live.sender.send(self.pb.InferenceResponse(output_tensors=tensors), flags=flags)
        if final:
            self.metrics.request_ended("completed")

    def _outputs(self, live: _Live, ids: list[int], lps: list[TokenLogprobs], reason: str, final: bool) -> list:
        """The response tensors: the names and dtypes protocol.OUTPUTS declares. `final`: the sample's last."""
        T = self.pb.Tensor
        out = []
        if live.text is not None:
            out.append(T("text_output", np.array([live.text.take(final).encode("utf-8")], dtype=object)))
        out += [
            T("output_ids", np.asarray(ids, dtype=np.int32)),
            T("finish_reason", np.array([reason.encode()], dtype=object)),
            T("prompt_tokens", np.array([len(live.parsed.prompt_ids)], dtype=np.int32)),
            T("completion_tokens", np.array([len(live.token_ids)], dtype=np.int32)),
            T("sample_index", np.array([live.sample_index], dtype=np.int32)),
        ]
        out_conf = live.output.confidences if live.output is not None else None
        if out_conf is not None:
            lowest = live.output.lowest_group_confidence
            out.append(T("lowest_group_confidence",
                         np.array([lowest if lowest is not None else np.nan], dtype=np.float64)))
            if live.parsed.return_confidences:
                # what this response's ids cover: the new ones when streaming, all of them at the end otherwise
                new = out_conf[len(out_conf) - len(ids):] if live.parsed.stream else out_conf
                out.append(T("confidences", np.asarray(new, dtype=np.float32)))
        k = live.parsed.params.logprobs
        if k:
            out += [
                T("output_logprobs", np.array([lp.logprob for lp in lps], dtype=np.float32)),
                T("top_logprobs", np.array([lp.top_logprobs for lp in lps], dtype=np.float32).reshape(len(lps), k)),
                T("top_ids", np.array([lp.top_ids for lp in lps], dtype=np.int32).reshape(len(lps), k)),
            ]
        return out

    def _send_error(self, sender: Any, message: str, code: str) -> None:
        """An error response with the FINAL flag. Never raises: a sender that fails (the client is gone) must not
        take the engine thread down with it."""
        self.metrics.request_ended(OUTCOME_OF_CODE.get(code, "failed"))
        cls = self.pb.TritonError
        code_value = getattr(cls, code, None)  # error codes exist from Triton 23.10
        try:
            error = cls(message, code_value) if code_value is not None else cls(message)
            sender.send(self.pb.InferenceResponse(output_tensors=[], error=error),
                        flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001
            log.error("%s: could not send an error response (%s):\n%s", self.name, message, traceback.format_exc())


def _parameters(request: Any) -> dict[str, Any]:
    """The request's parameters (gRPC `parameters`, or the generate endpoint's JSON fields that name no input)."""
    get = getattr(request, "parameters", None)
    if get is None:
        return {}
    raw = get()
    if not raw:
        return {}
    try:
        value = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except json.JSONDecodeError:
        return {"<unparsable>": raw}
    return value if isinstance(value, dict) else {"<parameters>": value}
