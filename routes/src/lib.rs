//! pinhole-routes: host routes for connected devices.
//!
//! What it is for: one /32 route per connected device through the client's TUN, tagged with a
//! private routing-protocol number ([`PROTOCOL`]), removed on disconnect and exit and swept at
//! start (a `kill -9` leaves none anyway: the kernel drops routes with their non-persistent
//! device, and the sweep catches anything else carrying our tag).
//!
//! Must not depend on: the protocol or the gateway; it is platform code behind a small
//! interface. rtnetlink changes its API often, so nothing outside this crate sees it.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use futures_util::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{RouteMessage, RouteProtocol};

/// The `rtm_protocol` of Pinhole's routes (`ip route` shows `proto 231`). Values above 200 are
/// unassigned in iproute2's rt_protos; 231 is used by no common daemon.
pub const PROTOCOL: u8 = 231;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
}

/// The host routes of one TUN device.
#[derive(Debug)]
pub struct Routes {
    handle: rtnetlink::Handle,
    ifindex: u32,
    installed: BTreeSet<Ipv4Addr>,
}

fn host_route(ip: Ipv4Addr, ifindex: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(ip, 32)
        .output_interface(ifindex)
        .protocol(RouteProtocol::Other(PROTOCOL))
        .build()
}

impl Routes {
    /// Opens a netlink connection (its driver runs on the current tokio runtime).
    pub fn new(ifindex: u32) -> Result<Self, RouteError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            ifindex,
            installed: BTreeSet::new(),
        })
    }

    /// Deletes every IPv4 route carrying [`PROTOCOL`] (left by a crashed daemon); returns how
    /// many.
    pub async fn sweep(&self) -> Result<usize, RouteError> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await?;
        let mut n = 0;
        for r in routes
            .into_iter()
            .filter(|r| r.header.protocol == RouteProtocol::Other(PROTOCOL))
        {
            self.handle.route().del(r).execute().await?;
            n += 1;
        }
        Ok(n)
    }

    /// Routes `ip/32` through the device (replacing a route of ours to the same address).
    pub async fn add(&mut self, ip: Ipv4Addr) -> Result<(), RouteError> {
        self.handle
            .route()
            .add(host_route(ip, self.ifindex))
            .replace()
            .execute()
            .await?;
        self.installed.insert(ip);
        Ok(())
    }

    pub async fn remove(&mut self, ip: Ipv4Addr) -> Result<(), RouteError> {
        if self.installed.remove(&ip) {
            self.handle
                .route()
                .del(host_route(ip, self.ifindex))
                .execute()
                .await?;
        }
        Ok(())
    }

    /// Removes every route this object added.
    pub async fn clear(&mut self) -> Result<(), RouteError> {
        for ip in std::mem::take(&mut self.installed) {
            self.handle
                .route()
                .del(host_route(ip, self.ifindex))
                .execute()
                .await?;
        }
        Ok(())
    }

    pub fn installed(&self) -> &BTreeSet<Ipv4Addr> {
        &self.installed
    }
}
