"""The fair share on the vLLM engine: which rows vLLM may hold, decided at our side, and pausing by recompute.

vLLM runs whatever it is sent, and on a CPU each row in its batch makes every step slower. So tunesmith sends vLLM at
most each tenant's share (:mod:`tunesmith.serve.engines.shares`, the built-in engine's rules): the rows past it wait
in their tenant's line here, and are sent when a row of the tenant ends or its share grows.

When a share shrinks below the rows a tenant has in vLLM (a light tenant arrived beside a flood), the rows past it
are *paused by recompute*: the vLLM request is closed (vLLM aborts a request whose client went away) and, when the
share allows, sent again as its continuation: the original prompt followed by the token ids generated so far, with
``max_tokens`` less what was generated. The caller sees one stream and one answer; vLLM's prefix cache spares part
of the continuation's prefill (whole KV blocks only: 128 tokens on the CPU build).

Only a row whose continuation is the answer it would have had may be paused (:func:`may_pause`). A row that may not
(under a schema, with stop strings, penalties or a seed) is *restarted* instead while its caller has seen none of
its answer (not streamed, or streamed with no text sent yet): closed, its tokens dropped, and sent again whole when
the share allows, so it ends with an answer it could have had (the same one, when greedy or seeded). Only a row
whose caller already reads its text keeps running past its share, and counts against it.

A step of vLLM's cannot be cut short, and on a CPU vLLM prefills a prompt whole, in one step with every other new
prompt: a key alone sending 64 at once made a 6.5 s step, which a key arriving then waits out. So each tenant also
has a prefill budget (:func:`within_prefill`): its rows are sent while its prompt tokens waiting for their first
token stay within it, and the next as those come back.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tunesmith.serve.engines.interface import GenParams, Request
from tunesmith.serve.engines.shares import Demand, Shares

if TYPE_CHECKING:
    from tunesmith.generation import TokenLogprob
    from tunesmith.serve.engines.vllm.wire import IdsAsked

LINE, RUNNING, PAUSED, DONE = "line", "running", "paused", "done"
TAIL_TOKENS = 8  # the generated tokens decoded to tell whether the text ends inside a character


def may_pause(params: GenParams, constrained: bool) -> bool:
    """Whether a row's continuation (its prompt plus the tokens generated so far) decodes what the row would have:

    - not under a constraint: vLLM's structured outputs start their grammar again at the continuation's first
      token, so the JSON already generated would be read as the start of a new one;
    - no stop strings: vLLM looks for them in the continuation's own text, so one across the boundary is missed;
    - no frequency or presence penalty: they count the tokens generated, and the continuation's count starts at 0;
    - not seeded sampling: a seed promises the same answer to the same request, and the continuation draws from
      the seed's generator afresh. Greedy rows (a seed does nothing there) and unseeded sampling may be paused:
      an unseeded continuation draws its tokens from the same distribution, given the same prefix.

    ``logit_bias`` is added to every step's logits alike, so a biased row continues exactly; so are ``top_k`` and
    the tokens that end a row (``stop_token_ids``, ``ignore_eos``: the continuation carries them, and no token it
    goes on from ended the row, else there would be nothing to continue)."""
    seeded_sampling = params.seed is not None and not params.greedy
    return not (constrained or params.stop or params.frequency_penalty or params.presence_penalty or seeded_sampling)


def ends_mid_character(tokenizer, ids: list[int]) -> bool:
    """Whether ``ids`` end inside a character (byte tokens of an unfinished UTF-8 sequence). vLLM's detokenizer
    holds such bytes back, and a continuation whose prompt ends with them would decode them with the wrong text
    around them, so a row is paused only at a character's end."""
    return bool(ids) and tokenizer.decode(ids[-TAIL_TOKENS:], skip_special_tokens=True).endswith("\ufffd")


@dataclass(eq=False, kw_only=True)
class Row:
    """One choice of one request: what vLLM is sent, where it is (its tenant's line, vLLM, paused, done), and what a
    pausable row has generated so far."""

    request: Request
    index: int
    body: dict  # the vLLM completions request of the whole choice
    model_id: str
    params: GenParams
    constraint: object = None
    tenant: str | None = None
    background: bool = False  # a batch's line: after its tenant's interactive rows
    stream: bool = False  # the caller streams (every row is streamed from vLLM)
    pausable: bool = False
    deadline: float = 0.0  # the event loop's time when the request's time is up
    state: str = LINE
    pause_asked: bool = False  # past its share: pause at the next character boundary
    stopping: bool = False  # its vLLM request closed for a pause, its task not yet ended
    prefill: int = 0  # prompt tokens sent to vLLM whose first token has not come back
    task: asyncio.Task | None = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[dict | None] = field(default_factory=list)  # each chunk's, without the prompt's and the end's
    prompt_logprobs: dict | None = None  # a scored prompt's (the echo's first entries)
    ids: IdsAsked | None = None  # the answer's token ids asked (Generation.ids): what they hold
    prompt_ids: list[TokenLogprob] | None = None  # a scored prompt's entries as ids, when ``ids`` asks for them
    end: dict | None = None  # the stop token's (its end of sequence, or one of stop_token_ids): vLLM lists it last
    finish: str | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.request.loop

    @property
    def restartable(self) -> bool:
        """Whether a row that may not be paused may start again from nothing: its caller has seen none of it."""
        return not self.pausable and not (self.stream and self.text)

    @property
    def yields(self) -> bool:
        """Whether the row can leave vLLM when its tenant's share shrinks (paused, or restarted)."""
        return self.pausable or self.restartable

    def restart(self) -> None:
        """Forget what a row that may not be paused generated: it is sent again whole."""
        self.generated, self.text, self.logprobs, self.finish = [], [], [], None
        self.prompt_logprobs = self.end = self.prompt_ids = None

    @property
    def prompt_tokens(self) -> int:
        """The prompt vLLM prefills when the row is sent: its own and what it generated before a pause."""
        return len(self.body["prompt"]) + len(self.generated)

    def continuation(self) -> dict:
        """The vLLM request that goes on from what was generated (the whole request when nothing was)."""
        body = {**self.body, "stream": True, "return_token_ids": True}
        if self.generated:
            body |= {"prompt": [*self.body["prompt"], *self.generated],
                     "max_tokens": self.body["max_tokens"] - len(self.generated)}
        return body

    def take(self, choice: dict, decode=None) -> str | None:
        """One streamed choice chunk of vLLM's: its token ids, text, logprobs and finish kept; the text to pass on
        (None: the chunk carries neither text nor a token's logprobs). A scored prompt's entries lead the first
        chunk's logprobs and the token that ended the row (the end of sequence, or one of ``stop_token_ids``: any
        stop but a stop string's) ends the last chunk's: each is kept apart; with ``max_tokens`` 0 vLLM generates a
        token it does not answer, not counted. Tokens vLLM named by id (asked for :attr:`ids`) are named by their
        text (``decode``: a token id's) once the prompt's entries are read as ids."""
        from tunesmith.serve.engines.vllm.wire import named_by_text, prompt_token_ids, split_logprobs

        lp, by_id = choice.get("logprobs"), self.body.get("return_tokens_as_token_ids")
        if lp and self.body.get("echo") and self.prompt_logprobs is None:
            self.prompt_logprobs, lp = split_logprobs(lp, len(self.body["prompt"]))
            if by_id:
                self.prompt_ids = prompt_token_ids(self.prompt_logprobs, self.body["prompt"], self.ids.prompt)
                self.prompt_logprobs = named_by_text(self.prompt_logprobs, decode)
        if by_id:
            lp = named_by_text(lp, decode)
        ids = (choice.get("token_ids") or ()) if self.body["max_tokens"] else ()
        self.generated.extend(ids)
        self.finish = choice.get("finish_reason") or self.finish
        by_token = not isinstance(choice.get("stop_reason"), str)  # a stop string's is the string
        if choice.get("finish_reason") == "stop" and by_token and ids and lp and lp["tokens"]:
            lp, self.end = split_logprobs(lp, len(lp["tokens"]) - 1)
        self.logprobs.append(lp)
        if choice.get("text") or (lp or {}).get("tokens"):
            self.text.append(choice.get("text") or "")
            return choice.get("text") or ""
        return None


def plan(rows: list[Row], shares: Shares) -> tuple[list[Row], list[Row]]:
    """The rows to send vLLM now and the rows to pause, so that each tenant holds its share
    (:meth:`Shares.quotas`). A tenant's places go first to its rows in vLLM that can neither pause nor restart, then
    to the others (the oldest first), then to its paused rows, then to its line; interactive before background, each
    in its own share. A row in vLLM past the share is paused (or restarted) when it may be, else it keeps running;
    a row kept loses a pause asked before. Rows on their way to a pause count as wanted and take no place."""
    mine: dict[object, dict[bool, list[Row]]] = {}
    for row in rows:
        mine.setdefault(row.tenant, {False: [], True: []})[row.background].append(row)
    quotas = shares.quotas({t: Demand(len(k[False]), len(k[True])) for t, k in mine.items()})
    start, pause = [], []
    for tenant, kinds in mine.items():
        for background, places in ((False, quotas[tenant].interactive), (True, quotas[tenant].background)):
            for row in sorted((r for r in kinds[background] if not r.stopping), key=place_order):
                if row.state == RUNNING and (places > 0 or not row.yields):
                    row.pause_asked = False
                    places -= 1
                elif row.state == RUNNING:
                    pause.append(row)
                elif places > 0:
                    start.append(row)
                    places -= 1
    return start, pause


def within_prefill(rows: list[Row], prefilling: dict, budget: int) -> list[Row]:
    """The rows (in order) that may be sent now so that no tenant has more than ``budget`` prompt tokens waiting for
    their first token (``prefilling``: tenant -> tokens); a tenant with none waiting may send one row of any length.
    A tenant's rows past its budget wait, in order, for its prompts in vLLM to be prefilled."""
    pending, full, out = Counter(prefilling), set(), []
    for row in rows:
        n = row.prompt_tokens
        if row.tenant in full or (pending[row.tenant] and pending[row.tenant] + n > budget):
            full.add(row.tenant)
            continue
        pending[row.tenant] += n
        out.append(row)
    return out


def place_order(row: Row) -> int:
    """Rows in vLLM that can neither pause nor restart first, then the others in vLLM, then paused rows, then the line
    (the sort is stable: each in arrival order)."""
    if row.state == RUNNING:
        return 1 if row.yields else 0
    return 2 if row.state == PAUSED else 3
