"""Export for serving: a SavedModel that plain TensorFlow loads and runs, no minimask import.

The exported endpoint ``serve(images uint8 [B, S, S, 3])`` returns the padded detections
of :meth:`minimask.model.MaskRCNN.call` plus ``full_masks`` (bool ``[B, D, S, S]``, the
masks pasted into the image), built with ``keras.export.ExportArchive``::

    import tensorflow as tf
    served = tf.saved_model.load("exported/")
    out = served.serve(images)      # dict of tensors; rows past num_detections are padding
"""
import tensorflow as tf
import keras

from minimask import postprocess


def serving_outputs(model, images):
    """The exported computation: the model's detections plus the masks pasted at full resolution."""
    out = model(images, training=False)
    batch, num_det = tf.shape(out["boxes"])[0], tf.shape(out["boxes"])[1]
    size = model.config.image_size
    m = tf.shape(out["masks"])[2]
    flat_masks = tf.reshape(out["masks"], [batch * num_det, m, m])
    flat_boxes = tf.reshape(out["boxes"], [batch * num_det, 4])
    pasted = postprocess.paste_masks(flat_masks, flat_boxes, (size, size), model.config.mask_threshold)
    valid = tf.range(num_det)[None, :] < out["num_detections"][:, None]  # [B, D]
    out = dict(out)
    out["full_masks"] = tf.reshape(pasted, [batch, num_det, size, size]) & valid[:, :, None, None]
    return out


def export_saved_model(model, path):
    """Write ``model`` as a SavedModel at ``path`` with the endpoint ``serve``."""
    size = model.config.image_size
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serve",
        fn=lambda images: serving_outputs(model, images),
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")],
    )
    archive.write_out(path, verbose=False)
    return path
