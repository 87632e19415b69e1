"""Chat: templates from a model directory (ChatML, HF's rendering context), LLM.chat on a
tiny checkpoint with a template, `pdserve generate --chat`, and chat through the coordinator
(rendered there with the model's template; INVALID_ARGUMENT without one)."""

from __future__ import annotations

import json

import pytest
from fake_worker import Cluster, FakeTokenizer, LoopThread, fake_outputs
from helpers_models import make_hf_checkpoint

from pdserve.cli import main as pdserve_main
from pdserve.coordinator.client import Client, ClientError
from pdserve.coordinator.config import CoordinatorConfig
from pdserve.coordinator.server import CoordinatorServer
from pdserve.engine.chat_template import ChatTemplate, load_chat_template
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import get_tokenizer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
HI = [{"role": "user", "content": "hi"}]


def test_chatml_rendering():
    t = ChatTemplate(CHATML)
    msgs = [{"role": "system", "content": "be brief"}, *HI]
    assert t.render(msgs) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi"
                              "<|im_end|>\n<|im_start|>assistant\n")
    assert t.render(HI, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_template_context_as_hf():
    src = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}"
           "{% endif %}{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}"
           "{% endfor %}{{ eos_token }}")
    t = ChatTemplate(src, bos_token="<s>", eos_token="</s>")
    assert t.render([{"role": "user", "content": "é\""}]) == '<s>"é\\""</s>'
    with pytest.raises(ValueError, match="chat template: user first"):
        t.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        t.render([])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        t.render([{"role": "user"}])
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError):
        sandboxed.render(HI)


def test_template_sources(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"},
                           {"name": "default", "template": "D{{ bos_token }}"}],
         "bos_token": {"content": "<s>"}}))
    assert load_chat_template(tmp_path).render(HI) == "D<s>"
    (tmp_path / "chat_template.jinja").write_text("J")  # a separate file wins
    assert load_chat_template(tmp_path).render(HI) == "J"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random llama checkpoint (byte tokenizer) with a ChatML template."""
    path = make_hf_checkpoint(tmp_path_factory.mktemp("chat"), "llama")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return path


def test_llm_chat(chat_model):
    from pdserve.llm import LLM

    llm = LLM(model=str(chat_model), num_blocks=64)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    rendered = llm.tokenizer.apply_chat_template(HI)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    [one] = llm.chat(HI, params)
    assert one.prompt_token_ids == list(rendered.encode())  # byte tokenizer
    assert one.token_ids == llm.generate(rendered, params)[0].token_ids
    two = [*HI, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    outs = llm.chat([HI, two], params)
    assert [o.token_ids for o in outs] == [one.token_ids, llm.chat(two, params)[0].token_ids]


def test_no_template_is_a_clear_error():
    from pdserve.llm import LLM

    llm = LLM(model="tiny", num_blocks=16)
    with pytest.raises(ValueError, match="model tiny has no chat template"):
        llm.chat(HI)
    with pytest.raises(ValueError, match="has no chat template"):
        get_tokenizer("tiny").apply_chat_template(HI)


def test_generate_cli_chat_local(chat_model, capsys):
    base = ["generate", "--local", "--model", str(chat_model), "--max-tokens", "4",
            "--temperature", "0", "--ignore-eos", "--json"]
    assert pdserve_main([*base, "--chat", "--prompt", "hi"]) == 0
    chat = json.loads(capsys.readouterr().out)
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert pdserve_main([*base, "--prompt", rendered]) == 0
    assert json.loads(capsys.readouterr().out) == chat
    assert pdserve_main([*base, "--chat", "--prompt-ids", "1,2"]) == 1
    assert "--chat takes --prompt" in capsys.readouterr().err
    assert pdserve_main([*base[:3], "tiny", *base[4:], "--chat", "--prompt", "hi"]) == 1
    assert "has no chat template" in capsys.readouterr().err


# --- through the coordinator (fake workers; the coordinator renders) -------------------------

class ChatFakeTokenizer(FakeTokenizer):
    def __init__(self, template: str | None) -> None:
        self.template = ChatTemplate(template) if template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise ValueError("model fake has no chat template")
        return self.template.render(messages, add_generation_prompt)


class ChatCluster(Cluster):
    def __init__(self, lt: LoopThread, template: str | None) -> None:
        self.lt, self.workers = lt, []
        self.config = CoordinatorConfig(port=0, heartbeat_s=0.05)
        self.coord = CoordinatorServer(self.config, tokenizer=ChatFakeTokenizer(template))
        lt.run(self.coord.start())
        self.address = self.coord.address


@pytest.mark.timeout(30)
@pytest.mark.parametrize("template", [CHATML, None])
def test_chat_through_coordinator(template, capsys):
    lt = LoopThread()
    c = ChatCluster(lt, template)
    try:
        c.add("prefill")
        c.add("decode")
        with Client(c.address, timeout_s=10) as cl:
            cl.wait_ready(n_prefill=1, n_decode=1, timeout_s=5)
            if template is None:
                with pytest.raises(ClientError, match="no chat template") as e:
                    cl.chat(HI, max_tokens=4)
                assert e.value.code.name == "INVALID_ARGUMENT"
                return
            prompt = FakeTokenizer().encode(ChatTemplate(CHATML).render(HI))
            r = cl.chat(HI, max_tokens=4, temperature=0)
            assert r.token_ids == fake_outputs(prompt, 4)[0]
            assert r.metrics["prompt_tokens"] == len(prompt)
            with pytest.raises(ClientError, match="chat has no messages"):
                cl.chat([], max_tokens=4)
            with pytest.raises(ValueError, match="exactly one"):
                cl.generate("text", messages=HI)
        assert pdserve_main(["generate", "--coordinator", c.address, "--chat", "--prompt", "hi",
                             "--max-tokens", "4", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == fake_outputs(prompt, 4)[0]
    finally:
        c.stop()
        lt.close()
