//! `depends_on`: a service's tasks wait until the services it depends on
//! are started, healthy or completed, as its conditions say.

use super::*;

/// Whether the services `spec` depends on are up as its conditions say;
/// its tasks wait until they are.
pub(super) fn dependencies_up(
    s: &Snapshot,
    spec: &ServiceSpec,
    tasks: &[Task],
) -> Result<(), String> {
    for d in &spec.depends_on {
        let Some(dep) = s.services.iter().find(|x| x.spec.name == d.service) else {
            return Err(format!(
                "waiting for service {} (it does not exist)",
                d.service
            ));
        };
        let mut of_dep = tasks.iter().filter(|t| t.service_id == dep.id);
        let up = match d.condition {
            DependCondition::Started => {
                of_dep.any(|t| t.is_live() && t.status.state == TaskState::Running)
            }
            DependCondition::Healthy => of_dep.any(|t| {
                t.is_live()
                    && t.status.state == TaskState::Running
                    && t.status.health == Some(Health::Healthy)
            }),
            DependCondition::Completed => of_dep
                .any(|t| t.status.state == TaskState::Complete && t.status.exit_code == Some(0)),
        };
        if !up {
            return Err(format!(
                "waiting for service {} ({:?})",
                d.service, d.condition
            ));
        }
    }
    Ok(())
}
