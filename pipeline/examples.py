"""Bundled example models, built locally and deterministically (no network, no downloads).

`build_example(name, out_dir)` builds one example into `out_dir` atomically and
describes it in `out_dir/example.json`. The digits examples all train on the same
fixed split of scikit-learn's bundled digits data set, recomputed in-process, so
each example builds on its own. TensorFlow, Keras, JAX and scikit-learn are
imported inside functions so that importing this module stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from pipeline import io
from pipeline.errors import ConfigError, InputError

EXAMPLES: tuple[str, ...] = (
    "digits_data",
    "digits_savedmodel",
    "digits_keras",
    "digits_h5",
    "digits_concrete",
    "digits_jax",
    "mobilenet_v2",
    "text_classifier",
    "digits_multitask",
    "digits_lstm",
)

SEED = 0
DIGITS_SHAPE = (8, 8, 1)
# The text example: token ids (0 pads) and an attention mask, one topic per sequence.
TEXT_VOCAB, TEXT_LENGTH, TEXT_TOPICS, TEXT_TOPIC_WORDS = 64, 16, 4, 8
TEXT_SIZES = {"train": 1200, "calibration": 200, "evaluation": 400}
DIGITS_CLASSES = 10
EVAL_SIZE = 360
CALIBRATION_SIZE = 256
MOBILENET_SHAPE = (224, 224, 3)
INPUT_NAME = "image"


class DigitsSplit(NamedTuple):
    x_train: np.ndarray  # (N, 8, 8, 1) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_eval: np.ndarray
    y_eval: np.ndarray


def digits_split() -> DigitsSplit:
    """The fixed train/evaluation split of the digits data every digits example uses."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]  # pixels are 0..16
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    eval_idx, train_idx = order[:EVAL_SIZE], order[EVAL_SIZE:]
    return DigitsSplit(images[train_idx], labels[train_idx], images[eval_idx], labels[eval_idx])


def build_example(name: str, out_dir: str | Path) -> Path:
    """Build example `name` into `out_dir`; nothing is left there if the build fails."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ConfigError(f"unknown example {name!r}; expected one of: {', '.join(EXAMPLES)}")
    target = Path(out_dir)
    with io.atomic_path(target) as staged:
        staged.mkdir()
        description = builder(staged)
        files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
        io.write_json(staged / "example.json", {"name": name, **description, "files": files})
    return target


def digits_concrete_functions(path: str, training: bool = False) -> list:
    """Concrete functions of the `digits_concrete` CNN with its weights loaded from `path`.

    `training=True` makes BatchNormalization normalise with the statistics of each
    batch instead of its moving averages: a deliberate bug for validation to catch.
    """
    import tensorflow as tf

    model = _concrete_cnn()
    model.load_weights(path)
    # The weights enter the graph as constants: the functions then own their state
    # (a graph capturing the model's variables breaks once the model is garbage
    # collected), and `stateless_call` returns BatchNormalization's moving-average
    # updates instead of assigning them, which would make training=True unconvertible.
    trainable = [np.asarray(v) for v in model.trainable_variables]
    non_trainable = [np.asarray(v) for v in model.non_trainable_variables]

    @tf.function(input_signature=[_digits_spec()])
    def serve(image: tf.Tensor) -> tf.Tensor:
        outputs, _ = model.stateless_call(trainable, non_trainable, image, training=training)
        return outputs

    # The weights are constants: an empty module is all the converter needs to write a signature.
    return [serve.get_concrete_function()], tf.Module()


def _build_digits_data(out: Path) -> dict[str, Any]:
    data = digits_split()
    calibration = slice(0, CALIBRATION_SIZE)
    rest = slice(CALIBRATION_SIZE, None)
    np.savez(out / "calibration.npz", x=data.x_train[calibration], y=data.y_train[calibration])
    np.savez(out / "train.npz", x=data.x_train[rest], y=data.y_train[rest])
    np.savez(out / "evaluation.npz", x=data.x_eval, y=data.y_eval)
    return {
        "format": "npz",
        "input_shape": [None, *DIGITS_SHAPE],
        "sizes": {
            "calibration": CALIBRATION_SIZE,
            "train": len(data.y_train) - CALIBRATION_SIZE,
            "evaluation": len(data.y_eval),
        },
    }


def _build_digits_savedmodel(out: Path) -> dict[str, Any]:
    from keras import layers

    _seed_everything()
    x = inputs = _digits_input()
    for filters in (16, 32):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    model = _digits_model(inputs, x)
    accuracy = _train(model, epochs=15)
    model.export(out / "saved_model", verbose=False)
    return _digits_description("saved_model", "saved_model", accuracy, measured_in="keras")


def _build_digits_keras(out: Path) -> dict[str, Any]:
    from keras import layers

    _seed_everything()
    inputs = _digits_input()
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(32, activation="relu")(x)
    model = _digits_model(inputs, x)
    accuracy = _train(model, epochs=10)
    model.save(out / "model.keras")
    return _digits_description("keras", "model.keras", accuracy, measured_in="keras")


def _build_digits_h5(out: Path) -> dict[str, Any]:
    import keras
    from keras import layers

    _seed_everything()
    inputs = _digits_input()
    x = layers.Flatten()(inputs)
    x = layers.Dense(64, activation="relu")(x)
    model = _digits_model(inputs, x)
    accuracy = _train(model, epochs=20)
    path = out / "model.h5"
    model.save(path)  # legacy HDF5, chosen by the suffix
    sample = digits_split().x_eval[:16]
    reloaded = keras.models.load_model(path)
    if not np.allclose(reloaded.predict(sample, verbose=0), model.predict(sample, verbose=0)):
        raise RuntimeError("the H5 model does not reload to the same predictions")
    return _digits_description("h5", "model.h5", accuracy, measured_in="keras")


def _build_digits_concrete(out: Path) -> dict[str, Any]:
    import tensorflow as tf

    _seed_everything()
    model = _concrete_cnn()
    _train(model, epochs=10)
    path = out / "model.weights.h5"
    model.save_weights(path)
    # Measure through the factory, so the recorded accuracy is what it serves.
    (function,), _ = digits_concrete_functions(str(path))
    data = digits_split()
    accuracy = _accuracy(function(tf.constant(data.x_eval)).numpy(), data.y_eval)
    description = _digits_description("concrete_function", "model.weights.h5", accuracy, measured_in="tf")
    description["factory"] = f"{__name__}:{digits_concrete_functions.__name__}"
    return description


def _build_digits_jax(out: Path) -> dict[str, Any]:
    try:
        import jax
    except ImportError as exc:
        raise InputError("jax is not installed: pip install 'litert-pipeline[jax]'") from exc
    import tensorflow as tf
    from jax.experimental import jax2tf

    _seed_everything()  # JAX itself is seeded through its explicit PRNG key
    data = digits_split()
    params = _train_jax_mlp(data)
    accuracy = _accuracy(np.asarray(_jax_mlp(params, data.x_eval)), data.y_eval)

    # jax2tf always uses native serialization now (enable_xla is deprecated and
    # ignored): the model becomes one XlaCallModule op holding StableHLO, which the
    # TFLite converter lowers to builtin ops. The batch dimension stays symbolic.
    predict = jax2tf.convert(_jax_mlp, with_gradient=False, polymorphic_shapes=[None, "(b, 8, 8, 1)"])
    module = tf.Module()
    module.params = jax.tree.map(tf.Variable, params)

    @tf.function(input_signature=[_digits_spec()], autograph=False)
    def serve(image: tf.Tensor) -> tf.Tensor:
        return predict(module.params, image)

    module.serve = serve
    signatures = {"serving_default": serve.get_concrete_function()}
    tf.saved_model.save(module, str(out / "saved_model"), signatures=signatures)
    return _digits_description("jax", "saved_model", accuracy, measured_in="jax")


def _build_mobilenet_v2(out: Path) -> dict[str, Any]:
    import keras

    _seed_everything()
    # A named input keeps the serving signature's input name stable (Keras would
    # otherwise name it after a process-wide counter, e.g. `keras_tensor_42`).
    image = keras.Input(MOBILENET_SHAPE, name=INPUT_NAME)
    # Logits, not softmax: random weights give near-uniform probabilities (~1e-3 each)
    # that an int8 output rounds to zero, which would make every parity check meaningless.
    model = keras.applications.MobileNetV2(
        weights=None, input_tensor=image, classes=1000, classifier_activation=None
    )
    _estimate_batchnorm_statistics(model, np.random.default_rng(SEED).uniform(-1, 1, (8, *MOBILENET_SHAPE)))
    model.export(out / "saved_model", verbose=False)
    return {"format": "saved_model", "model": "saved_model", "input_shape": [None, *MOBILENET_SHAPE]}


def _estimate_batchnorm_statistics(model: Any, inputs: np.ndarray) -> None:
    """Set each BatchNorm's moving mean/variance from the inputs it sees, layer by layer.

    Untrained BatchNorm (mean 0, variance 1) lets activations shrink ~1e5-fold through
    MobileNetV2, far below what int8/int16 scales can represent; real networks keep
    normalized activations, so the example should too.
    """
    import keras

    batch = inputs.astype(np.float32)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            values = keras.Model(model.inputs, layer.input)(batch, training=False)
            values = keras.ops.convert_to_numpy(values)
            layer.moving_mean.assign(values.mean(axis=(0, 1, 2)))
            layer.moving_variance.assign(values.var(axis=(0, 1, 2)))


def text_topics(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic "documents": (token ids, attention mask, topic). Each has 4 to 16 tokens, about
    a third of them words of its topic, one word of another topic, the rest neutral words."""
    ids = np.zeros((count, TEXT_LENGTH), np.int32)
    mask = np.zeros((count, TEXT_LENGTH), np.int32)
    topics = rng.integers(0, TEXT_TOPICS, count)
    first_word, neutral = 4, 4 + TEXT_TOPICS * TEXT_TOPIC_WORDS  # ids 1-3 are unused "special" tokens
    for row in range(count):
        length = int(rng.integers(4, TEXT_LENGTH + 1))
        topical = first_word + topics[row] * TEXT_TOPIC_WORDS + rng.integers(0, TEXT_TOPIC_WORDS, length)
        words = np.where(rng.random(length) < 0.35, topical, rng.integers(neutral, TEXT_VOCAB, length))
        other = (topics[row] + rng.integers(1, TEXT_TOPICS)) % TEXT_TOPICS
        words[rng.integers(0, length)] = first_word + other * TEXT_TOPIC_WORDS + rng.integers(0, TEXT_TOPIC_WORDS)
        ids[row, :length], mask[row, :length] = words, 1
    return ids, mask, topics.astype(np.int64)


def _build_text_classifier(out: Path) -> dict[str, Any]:
    """A one-block transformer-style topic classifier: two int32 inputs, a softmax output."""
    import keras

    _seed_everything()
    rng = np.random.default_rng(SEED)
    splits = {name: text_topics(size, rng) for name, size in TEXT_SIZES.items()}
    for name in ("calibration", "evaluation"):
        ids, mask, topics = splits[name]
        np.savez(out / f"{name}.npz", ids=ids, mask=mask, topic=topics)

    token_ids = keras.Input((TEXT_LENGTH,), dtype="int32", name="token_ids")
    attention_mask = keras.Input((TEXT_LENGTH,), dtype="int32", name="attention_mask")
    mask = keras.ops.cast(attention_mask, "float32")
    x = keras.layers.Embedding(TEXT_VOCAB, 16)(token_ids)
    query, key, value = (keras.layers.Dense(16)(x) for _ in range(3))
    scores = keras.ops.matmul(query, keras.ops.transpose(key, (0, 2, 1))) / 4.0
    # Padding gets a bias of -10 (not -1e9): int8 activations then keep a usable scale.
    scores = scores + (mask[:, None, :] - 1.0) * 10.0
    attended = keras.ops.matmul(keras.ops.softmax(scores, axis=-1), value)
    x = keras.layers.LayerNormalization()(x + keras.layers.Dense(16)(attended))
    x = x + keras.layers.Dense(16, activation="relu")(x)
    pooled = keras.ops.sum(x * mask[:, :, None], axis=1) / keras.ops.maximum(keras.ops.sum(mask, axis=1)[:, None], 1.0)
    topic = keras.layers.Dense(TEXT_TOPICS, activation="softmax", name="topic")(pooled)
    model = keras.Model({"token_ids": token_ids, "attention_mask": attention_mask}, {"topic": topic})
    model.compile(optimizer="adam", loss={"topic": "sparse_categorical_crossentropy"})
    ids, mask_values, topics = splits["train"]
    model.fit({"token_ids": ids, "attention_mask": mask_values}, {"topic": topics}, batch_size=32, epochs=15, verbose=0)
    ids, mask_values, topics = splits["evaluation"]
    predicted = model.predict({"token_ids": ids, "attention_mask": mask_values}, verbose=0)["topic"]
    model.save(out / "model.keras")
    return {"format": "keras", "model": "model.keras", "inputs": {"token_ids": [None, TEXT_LENGTH],
                                                                   "attention_mask": [None, TEXT_LENGTH]},
            "eval_accuracy": round(_accuracy(predicted, topics), 4), "accuracy_measured_in": "keras"}


def multitask_arrays(data_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The digits multitask example's extra input (each column's mean ink, 0 to 1) and its
    regression target (the share of the image that is ink, in percent)."""
    images = data_images[..., 0]
    return images.mean(axis=1).astype(np.float32), (100 * images.mean(axis=(1, 2)))[:, None].astype(np.float32)


def _build_digits_multitask(out: Path) -> dict[str, Any]:
    """Two named inputs (image, column features), two heads (digit class, ink percentage)."""
    import keras
    from keras import layers

    _seed_everything()
    data = digits_split()
    splits = {"train": (data.x_train[CALIBRATION_SIZE:], data.y_train[CALIBRATION_SIZE:]),
              "calibration": (data.x_train[:CALIBRATION_SIZE], data.y_train[:CALIBRATION_SIZE]),
              "evaluation": (data.x_eval, data.y_eval)}
    arrays = {}
    for name, (images, digits) in splits.items():
        features, ink = multitask_arrays(images)
        arrays[name] = {"image": images, "columns": features, "digit": digits, "ink": ink}
        if name != "train":
            np.savez(out / f"{name}.npz", **arrays[name])

    image = _digits_input()
    columns = keras.Input((DIGITS_SHAPE[1],), name="columns")
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    x = layers.MaxPooling2D()(x)
    x = layers.Concatenate()([layers.Flatten()(x), columns])
    x = layers.Dense(32, activation="relu")(x)
    digit = layers.Dense(DIGITS_CLASSES, activation="softmax", name="digit")(x)
    ink = layers.Dense(1, name="ink")(x)
    model = keras.Model([image, columns], [digit, ink])
    model.compile(optimizer="adam", loss=["sparse_categorical_crossentropy", "mse"], loss_weights=[1.0, 0.01])
    train = arrays["train"]
    model.fit([train["image"], train["columns"]], [train["digit"], train["ink"]], batch_size=32, epochs=30, verbose=0)
    evaluation = arrays["evaluation"]
    predicted_digit, predicted_ink = model.predict([evaluation["image"], evaluation["columns"]], verbose=0)
    model.save(out / "model.keras")
    return {"format": "keras", "model": "model.keras", "eval_accuracy": round(_accuracy(predicted_digit, evaluation["digit"]), 4),
            "eval_ink_mae": round(float(np.mean(np.abs(predicted_ink - evaluation["ink"]))), 5),
            "accuracy_measured_in": "keras"}


def _build_digits_lstm(out: Path) -> dict[str, Any]:
    """An LSTM reading each digit image as 8 rows of 8 pixels. `unroll=True` gives builtin ops
    only: without it, Keras 3 recurrent layers convert to select TF ops (TensorList) with TF 2.21."""
    from keras import layers

    _seed_everything()
    inputs = _digits_input()
    x = layers.Reshape(DIGITS_SHAPE[:2])(inputs)
    x = layers.LSTM(32, unroll=True)(x)
    model = _digits_model(inputs, x)
    accuracy = _train(model, epochs=20)
    model.save(out / "model.keras")
    return _digits_description("keras", "model.keras", accuracy, measured_in="keras")


_BUILDERS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "digits_data": _build_digits_data,
    "digits_savedmodel": _build_digits_savedmodel,
    "digits_keras": _build_digits_keras,
    "digits_h5": _build_digits_h5,
    "digits_concrete": _build_digits_concrete,
    "digits_jax": _build_digits_jax,
    "mobilenet_v2": _build_mobilenet_v2,
    "text_classifier": _build_text_classifier,
    "digits_multitask": _build_digits_multitask,
    "digits_lstm": _build_digits_lstm,
}


def _seed_everything() -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(SEED)  # seeds Python's random, NumPy and TensorFlow
    tf.config.experimental.enable_op_determinism()


def _digits_spec() -> Any:
    import tensorflow as tf

    return tf.TensorSpec([None, *DIGITS_SHAPE], tf.float32, name=INPUT_NAME)


def _digits_input() -> Any:
    import keras

    return keras.Input(DIGITS_SHAPE, name=INPUT_NAME)


def _digits_model(inputs: Any, features: Any) -> Any:
    import keras

    outputs = keras.layers.Dense(DIGITS_CLASSES, activation="softmax")(features)
    return keras.Model(inputs, outputs)


def _concrete_cnn() -> Any:
    """The `digits_concrete` architecture, shared by its builder and its factory."""
    from keras import layers

    x = inputs = _digits_input()
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    # BatchNormalization after a Dense layer sees one value per feature when given
    # one image, so with batch statistics (training=True) every image normalises to
    # the same output: the bug is blatant rather than a small numeric drift.
    x = layers.Dense(32, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    return _digits_model(inputs, x)


def _train(model: Any, epochs: int) -> float:
    """Train a Keras digits model on the shared split; return its evaluation accuracy."""
    data = digits_split()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(data.x_train, data.y_train, batch_size=32, epochs=epochs, verbose=0)
    return _accuracy(model.predict(data.x_eval, verbose=0), data.y_eval)


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=-1) == labels))


def _digits_description(model_format: str, model: str, accuracy: float, *, measured_in: str) -> dict[str, Any]:
    return {
        "format": model_format,
        "model": model,
        "input_shape": [None, *DIGITS_SHAPE],
        "eval_accuracy": round(accuracy, 4),
        "accuracy_measured_in": measured_in,
    }


def _jax_mlp(params: dict[str, Any], images: Any) -> Any:
    """Class probabilities of the `digits_jax` MLP (64 pixels -> 64 ReLU -> 10 softmax)."""
    import jax

    return jax.nn.softmax(_jax_mlp_logits(params, images))


def _jax_mlp_logits(params: dict[str, Any], images: Any) -> Any:
    import jax

    flat = images.reshape(images.shape[0], -1)
    hidden = jax.nn.relu(flat @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def _train_jax_mlp(data: DigitsSplit, steps: int = 300, learning_rate: float = 0.5) -> dict[str, np.ndarray]:
    """Full-batch gradient descent with plain `jax.grad` (no optimiser library)."""
    import jax
    import jax.numpy as jnp

    pixels, hidden = int(np.prod(DIGITS_SHAPE)), 64
    key_1, key_2 = jax.random.split(jax.random.PRNGKey(SEED))
    params = {
        "w1": jax.random.normal(key_1, (pixels, hidden)) * np.sqrt(2.0 / pixels),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(key_2, (hidden, DIGITS_CLASSES)) * np.sqrt(1.0 / hidden),
        "b2": jnp.zeros(DIGITS_CLASSES),
    }
    images, one_hot = jnp.asarray(data.x_train), jax.nn.one_hot(data.y_train, DIGITS_CLASSES)

    def loss(p: dict[str, Any]) -> Any:
        return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(_jax_mlp_logits(p, images)), axis=-1))

    @jax.jit
    def step(p: dict[str, Any]) -> dict[str, Any]:
        return jax.tree.map(lambda w, g: w - learning_rate * g, p, jax.grad(loss)(p))

    for _ in range(steps):
        params = step(params)
    return jax.tree.map(lambda w: np.asarray(w, dtype=np.float32), params)
