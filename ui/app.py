"""The Gradio page: chat and completion tabs, sampling controls, Stop, a status line.

Many users at once: replies stream concurrently up to ``PageLimits.concurrency`` (the
server batches them); Stop, Clear and the status line never wait behind a reply.
"""

from __future__ import annotations

import gradio as gr

from ui.chat import CHAT_TAB, COMPLETION_TAB, ChatService, PageLimits, Settings

STATUS_EVERY_S = 3.0


def build(service: ChatService) -> gr.Blocks:
    """The page, with its queue set up from ``service.limits``."""
    with gr.Blocks(title="GPT-2 on Triton") as page:
        gr.Markdown(
            "## GPT-2 on Triton\nStreaming from Triton Inference Server. GPT-2 is "
            "not a chat model: chat mode writes the conversation as a transcript "
            "for it to continue."
        )
        status = gr.Markdown("connecting…", elem_id="status")

        with gr.Accordion("Sampling", open=False, elem_id="sampling"):
            with gr.Row():
                max_tokens = gr.Slider(
                    1,
                    1024,
                    value=Settings.max_tokens,
                    step=1,
                    label="max tokens",
                    elem_id="max-tokens",
                )
                temperature = gr.Slider(
                    0,
                    2,
                    value=Settings.temperature,
                    step=0.05,
                    label="temperature (0 = greedy)",
                    elem_id="temperature",
                )
                top_k = gr.Slider(0, 200, value=Settings.top_k, step=1, label="top-k (0 = off)")
            with gr.Row():
                top_p = gr.Slider(0.05, 1, value=Settings.top_p, step=0.01, label="top-p")
                repetition_penalty = gr.Slider(
                    1, 2, value=Settings.repetition_penalty, step=0.01, label="repetition penalty"
                )
                seed = gr.Number(value=0, precision=0, label="seed (0 = random)")
                min_tokens = gr.Slider(
                    0,
                    1024,
                    value=0,
                    step=1,
                    elem_id="min-tokens",
                    label="min tokens (no end-of-text before)",
                )
        controls = [max_tokens, temperature, top_k, top_p, repetition_penalty, seed, min_tokens]

        with gr.Tab("Chat"):
            chatbot = gr.Chatbot(elem_id="chatbot", height=380, label="conversation")
            with gr.Row():
                message = gr.Textbox(
                    placeholder="Say something and press Enter",
                    show_label=False,
                    scale=6,
                    elem_id="chat-input",
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear conversation", size="sm")

        with gr.Tab("Completion"):
            prompt = gr.Textbox(lines=3, label="prompt", elem_id="completion-input")
            # Buttons above the output: a growing text must not move the Stop button away.
            with gr.Row():
                complete = gr.Button("Complete", variant="primary", elem_id="complete")
                stop_completion = gr.Button("Stop", variant="stop", elem_id="stop-completion")
            output = gr.Textbox(
                lines=8,
                max_lines=14,
                label="prompt + completion",
                interactive=False,
                autoscroll=True,
                elem_id="completion-output",
            )

        # Gradio passes gr.Request only to a parameter declared with its type, positionally.
        def chat(
            text,
            history,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            min_tokens,
            request: gr.Request,
        ):
            settings = Settings(
                max_tokens, temperature, top_k, top_p, repetition_penalty, seed, min_tokens
            )
            history = list(history or [])
            if not text.strip():
                yield history, text
                return
            asked = [*history, {"role": "user", "content": text}]
            yield asked, ""  # the user's message shows at once, before the reply starts
            for answer in service.chat(text, history, settings, request.session_hash):
                yield asked + answer, ""

        def completion(
            text,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            min_tokens,
            request: gr.Request,
        ):
            settings = Settings(
                max_tokens, temperature, top_k, top_p, repetition_penalty, seed, min_tokens
            )
            yield from service.complete(text, settings, request.session_hash)

        # Each tab's Stop stops that tab's reply only.
        def halt_chat(request: gr.Request):
            service.stop(request.session_hash, CHAT_TAB)

        def halt_completion(request: gr.Request):
            service.stop(request.session_hash, COMPLETION_TAB)

        def clear_chat(request: gr.Request):
            # a reply still streaming would write the cleared conversation back with its
            # next piece: it is stopped (on the server too) with the conversation
            service.stop(request.session_hash, CHAT_TAB)
            return []

        def status_line(request: gr.Request):
            return service.status_line(request.session_hash)

        # Every reply, chat or completion, from any user, counts against one limit.
        replies = {"concurrency_id": "replies", "concurrency_limit": service.limits.concurrency}
        # Quick events run as they come: they must never queue behind a streaming reply.
        at_once = {"concurrency_limit": None}
        # One event for Enter and Send: "once" (the default) then keeps a second request
        # out while a reply streams, from either; two events would each allow one, and
        # the second would start from the first's cut reply, as if it were whole.
        chat_event = gr.on(
            [message.submit, send.click],
            chat,
            [message, chatbot, *controls],
            [chatbot, message],
            trigger_mode="once",
            **replies,
        )
        stop.click(halt_chat, None, None, cancels=[chat_event], **at_once)
        complete_event = complete.click(completion, [prompt, *controls], output, **replies)
        stop_completion.click(halt_completion, None, None, cancels=[complete_event], **at_once)
        clear.click(clear_chat, None, chatbot, cancels=[chat_event], **at_once)

        page.load(status_line, None, status, **at_once)
        gr.Timer(STATUS_EVERY_S).tick(status_line, None, status, **at_once)
    return page.queue(default_concurrency_limit=service.limits.concurrency)


def worker_threads(limits: PageLimits) -> int:
    """Gradio's thread pool size: a streaming reply holds a thread while it waits for
    the next piece, so the pool must outgrow the replies, with room for the quick events
    (Gradio's default is 40)."""
    return max(40, limits.concurrency + 16)
