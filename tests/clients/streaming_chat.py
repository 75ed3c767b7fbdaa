"""A streaming chat demo in the style of the Gradio BLIP-2 chat apps: each answer is generated in a thread
and read from a TextIteratorStreamer as it comes, the conversation so far is the next prompt, decoding is
set with a GenerationConfig.

    python streaming_chat.py CHECKPOINT IMAGE
"""

import sys
from threading import Thread

import torch
from PIL import Image
from transformers import GenerationConfig, TextIteratorStreamer
from transformers import Blip2ForConditionalGeneration, Blip2Processor

model_id, img_path = sys.argv[1], sys.argv[2]
processor = Blip2Processor.from_pretrained(model_id)
model = Blip2ForConditionalGeneration.from_pretrained(model_id, torch_dtype=torch.float32)
model.eval()

image = Image.open(img_path).convert("RGB")
generation_config = GenerationConfig(max_new_tokens=6, do_sample=False, repetition_penalty=1.3,
                                     no_repeat_ngram_size=3)


def chat(history, message):
    prompt = " ".join(f"Question: {q} Answer: {a}" for q, a in history) + f" Question: {message} Answer:"
    inputs = processor(images=image, text=prompt.strip(), return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, timeout=20.0, skip_prompt=True, skip_special_tokens=True)
    generation_kwargs = dict(inputs, streamer=streamer, generation_config=generation_config)
    thread = Thread(target=model.generate, kwargs=generation_kwargs)
    thread.start()
    partial = ""
    chunks = []
    for new_text in streamer:
        partial += new_text
        chunks.append(new_text)
        print(new_text, end="", flush=True)
    thread.join()
    print()
    return partial.strip(), chunks


history = []
transcript = []
for message in ["what is in the picture?", "what color is it?", "and the background?"]:
    reply, chunks = chat(history, message)
    history.append((message, reply))
    transcript.append(chunks)
