"""Evaluation metrics and dataset formats: VQAv2 / OK-VQA / GQA accuracy, COCO / NoCaps caption
metrics (BLEU, CIDEr-D natively; METEOR, SPICE through pycocoevalcap + Java when present), and
COCO / Flickr30k retrieval recall@k. Needs no model; pycocoevalcap is optional and never imported
at import time.

Submodules not imported here: ``blip2.eval.run`` (the ``blip2 eval`` command: a model on a
benchmark's files, resumable, with the paper's presets), ``blip2.eval.tasks`` (which files each
benchmark reads, the presets, scoring) and ``blip2.demo.eval_sets`` (the shapes world written as
VQAv2 / GQA / Karpathy / NoCaps / retrieval files)."""

from blip2.eval.caption import (
    CaptionScores,
    cider_d,
    corpus_bleu,
    evaluate_captions,
    evaluate_nocaps,
    meteor_score,
    ptb_tokenize,
    spice_score,
    tokenize_captions,
)
from blip2.eval.formats import (
    NOCAPS_DOMAINS,
    CaptionedImage,
    GQAQuestion,
    KarpathyEntry,
    RetrievalSet,
    VQAAnnotation,
    VQAQuestion,
    read_caption_results,
    read_coco_captions,
    read_gqa_questions,
    read_karpathy,
    read_nocaps,
    read_retrieval,
    read_vqa_annotations,
    read_vqa_questions,
    read_vqa_results,
    write_caption_results,
    write_coco_captions,
    write_gqa_questions,
    write_karpathy,
    write_nocaps,
    write_retrieval,
    write_vqa_annotations,
    write_vqa_questions,
    write_vqa_results,
)
from blip2.eval.retrieval import (
    ranks_from_rankings,
    ranks_from_scores,
    recall_at_k,
    recall_summary,
    rerank_top_k,
    retrieval_recall,
    retrieval_recall_from_rankings,
)
from blip2.eval.vqa import (
    VQA_RULES,
    VQAScore,
    gqa_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_question_accuracy,
)

__all__ = [
    # vqa
    "normalize_answer", "process_punctuation", "process_digit_article", "vqa_question_accuracy",
    "VQAScore", "VQA_RULES", "vqa_accuracy", "gqa_accuracy",
    # captions
    "ptb_tokenize", "tokenize_captions", "corpus_bleu", "cider_d", "meteor_score", "spice_score",
    "CaptionScores", "evaluate_captions", "evaluate_nocaps",
    # retrieval
    "ranks_from_scores", "ranks_from_rankings", "recall_at_k", "recall_summary", "retrieval_recall",
    "retrieval_recall_from_rankings", "rerank_top_k",
    # formats
    "VQAQuestion", "VQAAnnotation", "GQAQuestion", "CaptionedImage", "KarpathyEntry", "RetrievalSet",
    "NOCAPS_DOMAINS", "read_vqa_questions", "write_vqa_questions", "read_vqa_annotations",
    "write_vqa_annotations", "read_vqa_results", "write_vqa_results", "read_gqa_questions",
    "write_gqa_questions", "read_coco_captions", "write_coco_captions", "read_nocaps", "write_nocaps",
    "read_caption_results", "write_caption_results", "read_karpathy", "write_karpathy",
    "read_retrieval", "write_retrieval",
]  # fmt: skip
