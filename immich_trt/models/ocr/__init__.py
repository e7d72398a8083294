"""PP-OCR text detection (DB) and recognition (SVTR + CTC), exactly as immich-ml 3.1.0.

Sources reproduced: immich-ml ``immich_ml/models/ocr/detection.py`` and
``recognition.py`` (preprocessing, box order, crops, output format) around RapidOCR
3.8.1 ``ch_ppocr_det/utils.py`` ``DBPostProcess`` and ``ch_ppocr_det/main.py``
``filter_det_res``, ``ch_ppocr_rec/main.py`` ``TextRecognizer`` and
``ch_ppocr_rec/utils.py`` ``CTCLabelDecode``. Quirks are kept on purpose (see
``immich-ml-contract.md`` 1.11 and 3.5-3.6): the detector subtracts 0.5 (not 127.5)
before scaling, ``sorted_boxes`` indexes line ids by the y order, detection scores stay
in DB-postprocess order, and crops use PIL's perspective transform.

Per-model parameters (:mod:`.processing`): Immich's constants by default; PP-OCRv6
(:mod:`.catalog`) and imported models carry their own normalisation, DB thresholds and
recognizer input height.

Optional shape buckets (``IMMICH_TRT_OCR_SHAPE_BUCKETS``) pad the detector input and
the recognizer width up to a fixed ladder so runtimes see few distinct shapes; off by
default because padding can change the network's outputs (see ``bench/ocr_buckets.md``).
"""

from .buckets import DET_BUCKETS, REC_WIDTH_BUCKETS, bucket
from .catalog import OcrSource, PackagedFiles, ocr_source, paddle_normalisation
from .ctc import CTCLabelDecode, read_characters
from .db_postprocess import (
    DBPostProcess,
    box_score_fast,
    box_score_slow,
    empty_detection,
    filter_det_res,
    get_mini_boxes,
    order_points_clockwise,
    sorted_boxes,
    unclip,
)
from .detection import (
    TextDetector,
    det_normalise,
    det_preprocess,
    det_resize,
    det_resize_shape,
    detection_sizes,
    pad_to_bucket,
)
from .graphs import CTC_INDEX, CTC_PROB, DET_INPUT_U8, DET_MEAN, DET_SCALE, ctc_reduced_model, det_uint8_model
from .processing import (
    IMMICH_DETECTION,
    IMMICH_RECOGNITION,
    METADATA_KEY,
    DetectionProcessing,
    RecognitionProcessing,
    from_metadata,
    to_metadata,
)
from .recognition import (
    REC_HEIGHT,
    REC_MIN_WIDTH,
    LineBatch,
    LineGeometry,
    TextRecognizer,
    crop_sizes,
    crop_text_line,
    crop_text_lines,
    line_batches,
    line_inputs,
    line_tensor,
    perspective_coefficients,
    rec_batches,
    rec_input_width,
    resize_clamps,
    resize_norm_img,
    resized_width,
)

__all__ = [
    "CTC_INDEX",
    "CTC_PROB",
    "DET_BUCKETS",
    "DET_INPUT_U8",
    "DET_MEAN",
    "DET_SCALE",
    "IMMICH_DETECTION",
    "IMMICH_RECOGNITION",
    "METADATA_KEY",
    "DetectionProcessing",
    "OcrSource",
    "PackagedFiles",
    "RecognitionProcessing",
    "from_metadata",
    "ocr_source",
    "paddle_normalisation",
    "to_metadata",
    "REC_HEIGHT",
    "REC_MIN_WIDTH",
    "REC_WIDTH_BUCKETS",
    "CTCLabelDecode",
    "DBPostProcess",
    "LineBatch",
    "LineGeometry",
    "TextDetector",
    "TextRecognizer",
    "box_score_fast",
    "box_score_slow",
    "bucket",
    "crop_sizes",
    "crop_text_line",
    "crop_text_lines",
    "ctc_reduced_model",
    "det_normalise",
    "det_preprocess",
    "det_resize",
    "det_resize_shape",
    "det_uint8_model",
    "detection_sizes",
    "empty_detection",
    "filter_det_res",
    "get_mini_boxes",
    "line_batches",
    "line_inputs",
    "line_tensor",
    "order_points_clockwise",
    "pad_to_bucket",
    "perspective_coefficients",
    "read_characters",
    "rec_batches",
    "rec_input_width",
    "resize_clamps",
    "resize_norm_img",
    "resized_width",
    "sorted_boxes",
    "unclip",
]
