"""The client libraries apps point at an OpenAI-compatible server, each with only ``base_url`` and ``api_key`` set,
against a live ``tunesmith serve`` on the embedded model: LangChain (invoke, stream, ``with_structured_output`` in
its three methods, ``bind_tools`` with a ``tool_choice``), instructor (TOOLS, JSON and JSON_SCHEMA modes), litellm
(plain, streamed, ``response_format``), pydantic-ai (an output type, as a tool call and as native structured
output), the Agents SDK (``output_type`` on chat completions and on Responses) and the official client (``parse``
and a forced call). Every call is made at ``max_tokens: 16``, and every structured call returns a parsed object: a
forced call generates only its arguments, so sixteen tokens hold them. One server per engine: the built-in engine
in ``make test``, vLLM in ``make test-vllm``. Nothing leaves the machine: litellm reads its model-cost map from its
package, tracing is off, and every client is pointed at the local server."""

import os

import pytest
from pydantic import BaseModel

from .conftest import EMBEDDED, embedded_server

pytestmark = pytest.mark.slow
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # litellm would fetch it from the network at import
os.environ.setdefault("OPENAI_AGENTS_DISABLE_TRACING", "1")
KEY = "k-local"
QUESTION = 'Alice is 31 years old. Answer in JSON, like {"name": "Bob", "age": 40}.'
MAX_TOKENS = 16  # every call's, and the server's own cap


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module", params=["builtin", pytest.param("vllm", marks=pytest.mark.vllm)])
def url(request, tmp_path_factory):
    with embedded_server(request.param, tmp_path_factory.mktemp("clients"), max_tokens=MAX_TOKENS,
                         api_keys=frozenset({KEY})) as url:
        yield url


def test_langchain(url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=EMBEDDED, base_url=url, api_key=KEY, temperature=0, max_retries=0, max_tokens=MAX_TOKENS)
    assert llm.invoke("Say hello.").content
    assert "".join(c.content for c in llm.stream("Say hello."))
    for method in ("json_schema", "function_calling", "json_mode"):
        answer = llm.with_structured_output(Person, method=method).invoke(QUESTION)
        assert isinstance(answer, Person), method
    called = llm.bind_tools([Person], tool_choice="Person").invoke(QUESTION)
    [call] = called.tool_calls
    assert call["name"] == "Person" and isinstance(Person(**call["args"]), Person), called


def test_instructor(url):
    import instructor
    import openai

    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON, instructor.Mode.JSON_SCHEMA):
        client = instructor.from_openai(openai.OpenAI(base_url=url, api_key=KEY, max_retries=0), mode=mode)
        answer = client.chat.completions.create(model=EMBEDDED, response_model=Person, temperature=0, max_retries=2,
                                                max_tokens=MAX_TOKENS, messages=[{"role": "user", "content": QUESTION}])
        assert isinstance(answer, Person), mode


def test_litellm(url):
    import litellm

    kw = {"model": f"openai/{EMBEDDED}", "api_base": url, "api_key": KEY, "temperature": 0, "max_tokens": MAX_TOKENS}
    plain = litellm.completion(messages=[{"role": "user", "content": "Say hello."}], **kw)
    assert plain.choices[0].message.content
    streamed = litellm.completion(messages=[{"role": "user", "content": "Say hello."}], stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed)
    reply = litellm.completion(messages=[{"role": "user", "content": QUESTION}], response_format=Person, **kw)
    assert isinstance(Person.model_validate_json(reply.choices[0].message.content), Person)


def test_pydantic_ai(url):
    from pydantic_ai import Agent, NativeOutput
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(EMBEDDED, provider=OpenAIProvider(base_url=url, api_key=KEY))
    settings = {"temperature": 0, "max_tokens": MAX_TOKENS}
    assert isinstance(Agent(model, output_type=Person).run_sync(QUESTION, model_settings=settings).output, Person)
    native = Agent(model, output_type=NativeOutput(Person)).run_sync(QUESTION, model_settings=settings)
    assert isinstance(native.output, Person)


def test_agents_sdk(url):
    import openai
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, set_tracing_disabled

    set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
    for model in (OpenAIChatCompletionsModel(EMBEDDED, client), OpenAIResponsesModel(EMBEDDED, client)):
        agent = Agent(name="extract", instructions="Extract the person.", model=model, output_type=Person,
                      model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS))
        assert isinstance(Runner.run_sync(agent, QUESTION).final_output, Person), model


def test_openai(url):
    import json

    import openai

    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    parsed = client.chat.completions.parse(model=EMBEDDED, messages=messages, response_format=Person, temperature=0,
                                           max_tokens=MAX_TOKENS)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    forced = client.chat.completions.create(model=EMBEDDED, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                            tools=[openai.pydantic_function_tool(Person)],
                                            tool_choice={"type": "function", "function": {"name": "Person"}})
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    assert isinstance(Person(**json.loads(choice.message.tool_calls[0].function.arguments)), Person)
