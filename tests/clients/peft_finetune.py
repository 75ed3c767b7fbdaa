"""LoRA fine-tuning of BLIP-2 for captioning with PEFT, in the style of PEFT's "Fine-tune BLIP-2 on an image
captioning dataset" notebook: a torch Dataset over (image, text) pairs, a collate function that runs the
processor, LoRA on the language model's attention, a plain training loop, then captions with the adapter
and the adapter saved.

    python peft_finetune.py CHECKPOINT IMAGE OUTPUT_DIR
"""

import sys

import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from transformers import Blip2ForConditionalGeneration, Blip2Processor

model_id, img_path, output_dir = sys.argv[1], sys.argv[2], sys.argv[3]

processor = Blip2Processor.from_pretrained(model_id)
model = Blip2ForConditionalGeneration.from_pretrained(model_id)

image = Image.open(img_path).convert("RGB")
examples = [{"image": image.rotate(angle), "text": text} for angle, text in
            [(0, "a dog on the grass"), (90, "a dog lying down"), (180, "the sky above a field"),
             (270, "a dog and a ball")]]


class ImageCaptioningDataset(Dataset):
    def __init__(self, dataset, processor):
        self.dataset = dataset
        self.processor = processor

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        return self.dataset[idx]


def collate_fn(batch):
    inputs = processor(images=[example["image"] for example in batch], text=[example["text"] for example in batch],
                       padding=True, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    labels[labels == processor.tokenizer.convert_tokens_to_ids("<image>")] = -100
    inputs["labels"] = labels
    return inputs


torch.manual_seed(0)  # reproducible adapters and batches
config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=["q_proj", "k_proj"])
model = get_peft_model(model, config)
model.print_trainable_parameters()

train_dataloader = DataLoader(ImageCaptioningDataset(examples, processor), shuffle=True, batch_size=2,
                              collate_fn=collate_fn)
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)

model.train()
losses = []
for epoch in range(2):
    for idx, batch in enumerate(train_dataloader):
        outputs = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                        attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss = outputs.loss
        losses.append(loss.item())
        print("Epoch", epoch, "Loss:", loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

model.eval()
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    generated_ids = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=10)
    logits = model(**processor(images=image, text="a dog", return_tensors="pt")).logits
caption = processor.batch_decode(generated_ids, skip_special_tokens=True)[0].strip()
print(caption)
model.save_pretrained(output_dir)
