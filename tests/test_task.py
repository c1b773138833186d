"""Task, TaskCollection, State, Execution, and the Persistable mix-in."""

from __future__ import annotations

import pickle
import time

import pytest
from helpers import Bare

import gc3session
from gc3session import Execution, InvalidArgument, Persistable, State, Task, TaskCollection
from gc3session.persistence import FilesystemStore
from gc3session.task import observe

# -- State ----------------------------------------------------------------------


def test_state_has_exactly_the_gc3libs_states():
    assert [s.value for s in State] == [
        "NEW",
        "SUBMITTED",
        "RUNNING",
        "STOPPED",
        "TERMINATING",
        "TERMINATED",
        "UNKNOWN",
    ]


def test_state_is_a_string():
    assert State.RUNNING == "RUNNING"
    assert str(State.RUNNING) == "RUNNING"
    assert f"{State.TERMINATED}" == "TERMINATED"
    assert isinstance(State.NEW, str)


def test_state_of_accepts_states_and_names():
    assert State.of("STOPPED") is State.STOPPED
    assert State.of(State.UNKNOWN) is State.UNKNOWN


def test_state_of_rejects_unknown_names_listing_the_known_ones():
    with pytest.raises(InvalidArgument) as excinfo:
        State.of("FINISHED")
    message = str(excinfo.value)
    assert "FINISHED" in message
    assert "TERMINATED" in message and "NEW" in message
    # InvalidArgument is also a ValueError
    with pytest.raises(ValueError):
        State.of("running")


def test_states_are_exported_from_the_package():
    assert gc3session.State is State
    assert gc3session.Task is Task
    assert gc3session.TaskCollection is TaskCollection
    assert gc3session.Persistable is Persistable


# -- Execution ------------------------------------------------------------------


def test_execution_starts_new_with_one_history_entry():
    before = time.time()
    execution = Execution()
    after = time.time()
    assert execution.state is State.NEW
    assert len(execution.history) == 1
    when, state = execution.history[0]
    assert state is State.NEW
    assert before <= when <= after
    assert execution.returncode is None
    assert execution.info == ""


def test_execution_records_every_state_change_with_its_time():
    execution = Execution()
    states = [State.SUBMITTED, State.RUNNING, State.TERMINATING, State.TERMINATED]
    for state in states:
        before = time.time()
        execution.state = state
        after = time.time()
        when, recorded = execution.history[-1]
        assert recorded is state
        assert before <= when <= after
    assert [s for _, s in execution.history] == [State.NEW, *states]
    times = [t for t, _ in execution.history]
    assert times == sorted(times)


def test_execution_state_accepts_strings_and_stores_states():
    execution = Execution()
    execution.state = "RUNNING"
    assert execution.state is State.RUNNING
    assert execution.history[-1][1] is State.RUNNING


def test_execution_setting_the_same_state_adds_no_history():
    execution = Execution()
    execution.state = State.RUNNING
    execution.state = State.RUNNING
    execution.state = "RUNNING"
    assert [s for _, s in execution.history] == [State.NEW, State.RUNNING]


def test_execution_going_back_to_an_earlier_state_is_recorded():
    execution = Execution()
    execution.state = State.RUNNING
    execution.state = State.STOPPED
    execution.state = State.RUNNING
    assert [s for _, s in execution.history] == [State.NEW, State.RUNNING, State.STOPPED, State.RUNNING]


def test_execution_rejects_an_unknown_state_and_keeps_the_old_one():
    execution = Execution()
    execution.state = State.RUNNING
    with pytest.raises(InvalidArgument):
        execution.state = "DONE"
    assert execution.state is State.RUNNING
    assert len(execution.history) == 2


def test_execution_initial_state_can_be_given():
    assert Execution("RUNNING").state is State.RUNNING
    assert Execution(State.STOPPED).history[0][1] is State.STOPPED
    with pytest.raises(InvalidArgument):
        Execution("nope")


def test_execution_returncode_and_info():
    execution = Execution()
    execution.returncode = 3
    execution.info = "exit 3"
    assert (execution.returncode, execution.info) == (3, "exit 3")
    assert "returncode=3" in repr(execution)


def test_execution_changed_flag():
    execution = Execution()
    assert execution.changed
    execution.changed = False
    assert not execution.changed
    execution.state = State.RUNNING
    assert execution.changed
    execution.changed = False
    execution.returncode = 0
    assert execution.changed
    execution.changed = False
    execution.info = "ok"
    assert execution.changed


# -- Task -----------------------------------------------------------------------


def test_task_keyword_attributes_become_attributes():
    task = Task(jobname="fit-1", alpha=0.1, files=["a", "b"])
    assert task.jobname == "fit-1"
    assert task.alpha == 0.1
    assert task.files == ["a", "b"]


def test_task_default_jobname_is_the_class_name():
    assert Task().jobname == "Task"
    assert TaskCollection().jobname == "TaskCollection"


def test_task_state_is_the_execution_state():
    task = Task()
    assert task.state is State.NEW
    assert task.execution.state is State.NEW
    task.state = State.SUBMITTED
    assert task.execution.state is State.SUBMITTED
    task.execution.state = "RUNNING"
    assert task.state is State.RUNNING
    assert [s for _, s in task.execution.history] == [State.NEW, State.SUBMITTED, State.RUNNING]


def test_task_rejects_unknown_state():
    task = Task()
    with pytest.raises(InvalidArgument):
        task.state = "EXPLODED"
    assert task.state is State.NEW


def test_new_task_is_changed_and_unsaved():
    task = Task()
    assert task.changed
    assert task.persistent_id is None


def test_task_changed_flag_follows_assignments_and_state_changes():
    task = Task(jobname="x")
    task.changed = False
    assert not task.changed
    assert not task.execution.changed  # clearing the task clears its execution

    task.alpha = 1
    assert task.changed
    task.changed = False

    task.state = State.RUNNING
    assert task.changed, "a state change must mark the task changed"
    task.changed = False

    task.execution.returncode = 0
    assert task.changed, "a change inside the execution marks the task changed"
    task.changed = False

    task.execution.info = "done"
    assert task.changed


def test_deleting_an_attribute_marks_the_task_changed():
    task = Task(secret="s")
    task.changed = False
    del task.secret
    assert task.changed and not hasattr(task, "secret")


def test_a_task_execution_must_be_an_execution():
    with pytest.raises(InvalidArgument, match="execution must be an Execution, not str"):
        Task(jobname="x", execution="local")
    task = Task()
    task.execution = Execution("SUBMITTED")
    assert task.state == State.SUBMITTED


def test_a_replaced_execution_keeps_its_observer():
    task, seen = Task(), []
    observe(task.execution, lambda old, new: seen.append((old, new)))
    task.execution = Execution("SUBMITTED")
    task.state = "TERMINATED"
    assert seen == [(State.SUBMITTED, State.TERMINATED)]


def test_task_changed_can_be_set_true_explicitly():
    task = Task()
    task.changed = False
    task.changed = True
    assert task.changed


def test_task_changed_flag_survives_pickling():
    task = Task(jobname="p", alpha=2)
    task.state = State.RUNNING
    task.changed = False
    copy = pickle.loads(pickle.dumps(task))
    assert copy.jobname == "p" and copy.alpha == 2
    assert copy.state is State.RUNNING
    assert [s for _, s in copy.execution.history] == [State.NEW, State.RUNNING]
    assert not copy.changed


def test_task_repr_names_id_jobname_and_state():
    task = Task(jobname="fit-7")
    assert "unsaved" in repr(task)
    assert "fit-7" in repr(task)
    assert "NEW" in repr(task)
    task.persistent_id = "Task.12"
    assert "Task.12" in repr(task)


# -- TaskCollection -------------------------------------------------------------


def test_task_collection_holds_children_in_tasks():
    children = [Task(jobname=f"p{i}") for i in range(3)]
    collection = TaskCollection(jobname="grid", tasks=children)
    assert collection.jobname == "grid"
    assert collection.tasks == children
    assert all(a is b for a, b in zip(collection.tasks, children, strict=True))
    assert list(collection) == children
    assert isinstance(collection, Task)
    assert collection.state is State.NEW


def test_task_collection_copies_the_iterable_it_is_given():
    children = [Task(), Task()]
    collection = TaskCollection(tasks=children)
    children.append(Task())
    assert len(collection.tasks) == 2
    generated = TaskCollection(tasks=(Task(jobname=str(i)) for i in range(4)))
    assert [t.jobname for t in generated.tasks] == ["0", "1", "2", "3"]


def test_task_collection_without_tasks_is_empty():
    assert TaskCollection().tasks == []
    assert TaskCollection(tasks=None).tasks == []


def test_task_collection_add_appends_and_marks_changed():
    collection = TaskCollection()
    collection.changed = False
    child = Task()
    collection.add(child)
    assert collection.tasks == [child]
    assert collection.changed


def test_task_collection_takes_extra_attributes():
    collection = TaskCollection(jobname="g", tasks=[], owner="me")
    assert collection.owner == "me"


# -- Persistable ----------------------------------------------------------------


def test_unsaved_persistables_compare_by_identity():
    a, b = Task(jobname="same"), Task(jobname="same")
    assert a == a
    assert a != b
    assert not (a == b)
    assert len({a, b}) == 2
    assert {a: 1}.get(b) is None


def test_persistables_with_the_same_id_are_equal_and_hash_alike():
    a, b = Task(jobname="one"), Task(jobname="another")
    a.persistent_id = b.persistent_id = "Task.5"
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    c = Task()
    c.persistent_id = "Task.6"
    assert a != c


def test_saved_and_unsaved_are_not_equal():
    a, b = Task(), Task()
    a.persistent_id = "Task.1"
    assert a != b
    assert b != a


def test_persistable_is_not_equal_to_other_types():
    task = Task()
    task.persistent_id = "Task.1"
    assert task != "Task.1"
    assert task != 1
    assert (task == object()) is False


def test_equality_across_persistable_classes_follows_the_id():
    task = Task()
    bare = Bare(1)
    task.persistent_id = bare.persistent_id = "Task.9"
    assert task == bare


def test_persistable_subclass_without_init_call_has_defaults():
    bare = Bare(42)
    assert "persistent_id" not in vars(bare)
    assert bare.persistent_id is None
    assert bare.changed is True
    assert bare == bare
    assert bare != Bare(42)
    assert hash(bare) == hash(bare)


def test_persistable_created_without_any_init_works():
    obj = Bare.__new__(Bare)
    assert obj.persistent_id is None
    assert obj.changed
    assert obj == obj


def test_persistable_subclass_without_init_call_saves_and_loads(tmp_path):
    store = FilesystemStore(tmp_path / "store")
    bare = Bare({"k": [1, 2]})
    oid = store.save(bare)
    assert bare.persistent_id == oid
    assert oid.startswith("Bare.")
    assert bare.changed is False
    other = FilesystemStore(tmp_path / "store").load(oid)
    assert other is not bare
    assert isinstance(other, Bare)
    assert other.value == {"k": [1, 2]}
    assert other == bare
    assert hash(other) == hash(bare)
    assert other.changed is False


def test_persistable_class_defaults_are_not_shared_between_instances(tmp_path):
    store = FilesystemStore(tmp_path / "store")
    a, b = Bare(1), Bare(2)
    store.save(a)
    assert a.persistent_id is not None
    assert b.persistent_id is None, "saving one object must not give others an id"
    assert b.changed is True
    assert Persistable.persistent_id is None
    assert Persistable.changed is True


def test_setting_the_same_state_again_changes_nothing():
    task = Task()
    task.state = State.RUNNING
    task.changed = False
    task.state = State.RUNNING
    task.execution.state = "RUNNING"
    assert not task.changed
    assert [s for _, s in task.execution.history] == [State.NEW, State.RUNNING]
    task.state = State.TERMINATED
    assert task.changed


def test_a_state_change_has_its_history_entry_before_it_marks_the_execution_changed():
    """A save that cleared the mark between the two steps stored the state without its entry, and never again."""
    seen = []

    class Watched(Execution):
        def __setattr__(self, name, value):
            if name == "_state" and "history" in self.__dict__:  # not while it is made
                seen.append(self.history[-1][1])
            super().__setattr__(name, value)

    execution = Watched()
    execution.state = State.RUNNING
    assert seen[-1] == State.RUNNING
