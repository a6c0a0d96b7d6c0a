"""TrainConfig's groups: gin binds each by class and scope, replace takes a group's changes as a
dict, and the bindings a config writes rebuild it."""
import gin
import pytest

from teacherlm_jax.training import train_config as tc


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_gin_scopes_reach_the_groups_of_a_scoped_train_config():
  gin.parse_config("""
      OptimizerConfig.learning_rate = 1e-3
      teacher/OptimizerConfig.learning_rate = 2e-5
      teacher/DataConfig.seq_len = 2048
      student/TrainConfig.num_steps = 7
      MeshConfig.tensor = 4
  """)
  with gin.config_scope("teacher"):
    teacher = tc.TrainConfig()
  with gin.config_scope("student"):
    student = tc.TrainConfig()
  assert (teacher.optimizer.learning_rate, teacher.data.seq_len) == (2e-5, 2048)
  assert (student.optimizer.learning_rate, student.data.seq_len) == (1e-3, 256)
  assert (teacher.num_steps, student.num_steps) == (100, 7)
  assert teacher.mesh.tensor == student.mesh.tensor == 4


def test_replace_changes_fields_of_a_group_and_keeps_the_rest():
  config = tc.TrainConfig(data=tc.DataConfig(seq_len=64, batch_size=4))
  changed = config.replace(num_steps=5, data=dict(seq_len=128), mesh=tc.MeshConfig(fsdp=2))
  assert (changed.num_steps, changed.data.seq_len, changed.data.batch_size) == (5, 128, 4)
  assert changed.mesh == tc.MeshConfig(fsdp=2)
  assert config.data.seq_len == 64  # Frozen: the original is unchanged.
  with pytest.raises(TypeError):
    config.replace(data=dict(sequence_length=128))


def test_gin_bindings_rebuild_the_config():
  config = tc.TrainConfig(
      model=tc.ModelSettings(preset="tiny-llama", overrides={"num_layers": 1}),
      optimizer=tc.OptimizerConfig(learning_rate=3e-3, grad_accum_steps=2),
      checkpoint=tc.CheckpointConfig(every=4, async_save=False), num_steps=9)
  gin.parse_config("\n".join(config.gin_bindings()))
  assert tc.TrainConfig() == config
  assert config.flat()["optimizer.grad_accum_steps"] == 2 and config.flat()["num_steps"] == 9


@pytest.mark.parametrize("make, message", [
    (lambda: tc.DataConfig(batch_size=0), r"DataConfig.batch_size=0 must be >= 1"),
    (lambda: tc.TrainConfig(num_steps=0), r"TrainConfig.num_steps=0 must be >= 1"),
    (lambda: tc.CheckpointConfig(keep=0), r"CheckpointConfig.keep=0 must be >= 1"),
    (lambda: tc.ModelSettings(init_checkpoint="a", init_hf_checkpoint="b"), r"at most one"),
    (lambda: tc.ModelSettings(compute_dtype="float16"), r"compute_dtype='float16'"),
])
def test_bad_values_are_refused_naming_the_field(make, message):
  with pytest.raises(ValueError, match=message):
    make()
