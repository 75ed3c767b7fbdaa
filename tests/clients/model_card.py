"""The usage snippets of the Salesforce/blip2-opt-2.7b model card (running on CPU): a question, a caption,
batched prompts with beam search. The checkpoint and the image come from the command line instead of the Hub
id and an image URL.

    python model_card.py CHECKPOINT IMAGE
"""

import sys

from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

model_id = sys.argv[1] if len(sys.argv) > 1 else "Salesforce/blip2-opt-2.7b"
img_path = sys.argv[2]

processor = Blip2Processor.from_pretrained(model_id)
model = Blip2ForConditionalGeneration.from_pretrained(model_id)

raw_image = Image.open(img_path).convert("RGB")

question = "how many dogs are in the picture?"
inputs = processor(raw_image, question, return_tensors="pt")

out = model.generate(**inputs)
answer = processor.decode(out[0], skip_special_tokens=True).strip()
print(answer)

# image captioning: no prompt
inputs = processor(images=raw_image, return_tensors="pt")
generated_ids = model.generate(**inputs, max_new_tokens=20)
caption = processor.batch_decode(generated_ids, skip_special_tokens=True)[0].strip()
print(caption)

# several questions at once, beam search
prompts = ["Question: what is in the picture? Answer:", "Question: what color is the dog? Answer:"]
inputs = processor(images=[raw_image, raw_image], text=prompts, padding=True, return_tensors="pt")
generated_ids = model.generate(**inputs, num_beams=3, max_new_tokens=10, repetition_penalty=1.5)
answers = processor.batch_decode(generated_ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
print(answers)
