"""Feature extraction as retrieval and probing scripts do it: image, Q-Former and text features from
Blip2Model, and every layer's hidden states of the vision encoder.

    python feature_extraction.py CHECKPOINT IMAGE
"""

import sys

import torch
from PIL import Image
from transformers import Blip2Model, Blip2Processor

model_id, img_path = sys.argv[1], sys.argv[2]
processor = Blip2Processor.from_pretrained(model_id)
model = Blip2Model.from_pretrained(model_id)
model.eval()

image = Image.open(img_path).convert("RGB")
inputs = processor(images=[image, image.rotate(90)], return_tensors="pt")

with torch.no_grad():
    image_outputs = model.get_image_features(**inputs)
    image_embeds = image_outputs.last_hidden_state
    pooled = image_outputs.pooler_output
    qformer_features = model.get_qformer_features(**inputs)

    text_inputs = processor.tokenizer(["a photo of a dog", "two cats"], padding=True, return_tensors="pt")
    text_features = model.get_text_features(**text_inputs).last_hidden_state

    vision_outputs = model.vision_model(inputs["pixel_values"], output_hidden_states=True, return_dict=True)
    hidden_states = torch.stack(vision_outputs.hidden_states)  # [layers + 1, B, tokens, width]

embedding = torch.nn.functional.normalize(qformer_features.mean(1), dim=-1)  # one vector per image
print(image_embeds.shape, pooled.shape, qformer_features.shape, text_features.shape, hidden_states.shape)
