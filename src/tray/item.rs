//! The StatusNotifierItem: renders the [`model`](super::model) with ksni (which serves
//! `org.kde.StatusNotifierItem` and `com.canonical.dbusmenu`) and turns clicks into
//! [`Action`]s on a channel. Nothing is decided here.

use tokio::sync::mpsc::UnboundedSender;

use super::model::{self, Action, Entry, Snapshot};

#[derive(Debug)]
pub struct Item {
    pub snap: Snapshot,
    pub actions: UnboundedSender<Action>,
}

impl Item {
    fn send(&self, a: Action) {
        // The receiver lives as long as the tray's loop; after it, clicks have nowhere to go.
        let _ = self.actions.send(a);
    }
}

fn render(entry: Entry) -> ksni::MenuItem<Item> {
    use ksni::menu::{CheckmarkItem, StandardItem, SubMenu};
    match entry {
        Entry::Text(text) => StandardItem {
            label: model::menu_label(&text),
            enabled: false,
            ..Default::default()
        }
        .into(),
        Entry::Separator => ksni::MenuItem::Separator,
        Entry::Button {
            label,
            enabled,
            action,
        } => StandardItem {
            label: model::menu_label(&label),
            enabled,
            activate: Box::new(move |item: &mut Item| item.send(action.clone())),
            ..Default::default()
        }
        .into(),
        Entry::Device {
            label,
            checked,
            enabled,
            action,
        } => CheckmarkItem {
            label: model::menu_label(&label),
            checked,
            enabled,
            activate: Box::new(move |item: &mut Item| item.send(action.clone())),
            ..Default::default()
        }
        .into(),
        Entry::Toggle {
            label,
            checked,
            action,
        } => CheckmarkItem {
            label: model::menu_label(&label),
            checked,
            activate: Box::new(move |item: &mut Item| item.send(action.clone())),
            ..Default::default()
        }
        .into(),
        Entry::Submenu {
            label,
            enabled,
            entries,
        } => SubMenu {
            label: model::menu_label(&label),
            enabled,
            submenu: entries.into_iter().map(render).collect(),
            ..Default::default()
        }
        .into(),
    }
}

impl ksni::Tray for Item {
    fn id(&self) -> String {
        "pinhole".into()
    }

    fn title(&self) -> String {
        "Pinhole".into()
    }

    fn icon_name(&self) -> String {
        model::icon(&self.snap).name().into()
    }

    fn tool_tip(&self) -> ksni::ToolTip {
        ksni::ToolTip {
            icon_name: self.icon_name(),
            title: model::status_line(&self.snap),
            description: model::tooltip(&self.snap),
            icon_pixmap: Vec::new(),
        }
    }

    fn menu(&self) -> Vec<ksni::MenuItem<Self>> {
        model::menu(&self.snap).into_iter().map(render).collect()
    }

    fn menu_about_to_show(&mut self) {
        self.send(Action::Refresh);
    }

    fn watcher_offline(&self, reason: ksni::OfflineReason) -> bool {
        // The panel restarted or is not up yet: keep running, ksni registers again when a
        // StatusNotifierWatcher appears.
        tracing::info!(?reason, "no StatusNotifier host; waiting for one");
        true
    }
}
