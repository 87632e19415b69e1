"""The both role: one worker prefills and decodes its own requests (colocated serving).

It is the baseline of the P/D experiments and the local path for prompts that are not
worth a transfer. Its batching is the engine's own, phase-less one: chunked prefills and
decode steps share each step's token budget (mixed batches), with decode CUDA graphs.
"""

from __future__ import annotations

from pdserve.proto import pdserve_pb2 as pb
from pdserve.worker.core import WorkerCore
from pdserve.worker.role import Role, register_role


async def generate_locally(core: WorkerCore, request: pb.GenerateWorkerRequest, context):
    """Worker.Generate: prefill the prompt here, then decode it (the engine's mixed batches).
    The both role serves every request this way; the decode role serves the prompts that the
    coordinator's conditional disaggregation keeps off the prefill pool."""
    seq = await core.new_sequence(context, request.request_id, request.prompt_token_ids,
                                  request.sampling, output_offset=request.num_output_tokens)
    st, _ = await core.admit(context, seq)
    async for chunk in core.stream_tokens(st, context):
        yield chunk


@register_role("both")
class BothRole(Role):
    queues_prefill = True

    async def generate(self, request: pb.GenerateWorkerRequest, context):
        async for chunk in generate_locally(self.core, request, context):
            yield chunk
