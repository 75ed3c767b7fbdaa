"""Loading BLIP-2 in 8-bit on a GPU with bitsandbytes, as the model card's "in 8-bit precision (int8)"
snippet does, then answering a question.

    python quantized_loading.py CHECKPOINT IMAGE
"""

import sys

import torch
from PIL import Image
from transformers import BitsAndBytesConfig
from transformers import Blip2ForConditionalGeneration, Blip2Processor

model_id, img_path = sys.argv[1], sys.argv[2]
processor = Blip2Processor.from_pretrained(model_id)
quantization_config = BitsAndBytesConfig(load_in_8bit=True)
model = Blip2ForConditionalGeneration.from_pretrained(model_id, quantization_config=quantization_config,
                                                      device_map={"": 0}, torch_dtype=torch.float16)

raw_image = Image.open(img_path).convert("RGB")
inputs = processor(raw_image, "Question: how many dogs are there? Answer:", return_tensors="pt").to("cuda",
                                                                                                  torch.float16)
out = model.generate(**inputs, max_new_tokens=10)
answer = processor.decode(out[0], skip_special_tokens=True).strip()
print(answer)
