"""allot.billing.v1.BillingService: requests in, use cases called, responses out.

Every RPC of BillingService (protos/, docs/contract.md) is served here; the work is in ``app/``.
"""

from __future__ import annotations

from allot.billing.v1 import billing_pb2, billing_service_pb2, billing_service_pb2_grpc
from allot.quota.v1 import quota_pb2

from services.billing.adapters.events import order_message
from services.billing.api import convert, what_if
from services.billing.app import (
    accounts,
    batch_renewals,
    bills,
    fulfilment,
    line_explanations,
    orders,
    overview,
    recommendations,
    renewals,
    replenish,
    standing,
    subscriptions,
)
from services.billing.app.context import BillingContext
from shared.auth import check_scope, current_principal, hiding_absence
from shared.errors import InvalidArgument
from shared.idempotency import IdempotencyStore
from shared.pagination import decode_page_token, encode_page_token, page_size, paged, paged_list
from shared.timeutil import from_timestamp
from shared.validation import check_account_id, check_enum


def _check_order(order) -> None:
    check_scope(order.account_id, order.region)


class BillingServicer(billing_service_pb2_grpc.BillingServiceServicer):
    def __init__(self, ctx: BillingContext, idempotency: IdempotencyStore) -> None:
        self.ctx = ctx
        self._idempotent = idempotency.bound(ctx.db, ctx.now)

    # --- accounts -------------------------------------------------------------------------

    async def CreateAccount(self, request, context):
        spec = convert.from_proto_account(request.account)

        async def work(uow):
            return convert.to_proto_account(await accounts.create_account(self.ctx, uow, spec))

        return await self._idempotent("CreateAccount", request, billing_pb2.Account, work)

    async def GetAccount(self, request, context):
        account = await hiding_absence(accounts.get_account(self.ctx, request.account_id))
        check_scope(account.account_id)
        return convert.to_proto_account(account)

    async def ListAccounts(self, request, context):
        principal = current_principal()
        only = None if principal.is_operator else principal.account
        if request.master_account_id and not principal.is_operator:
            # A master's tokens list its members (docs/security.md); anyone else naming a
            # master is refused, as for another account's resources.
            principal.check_account(request.master_account_id)
            only = None
        page, token = await paged(
            request,
            lambda after, limit: accounts.list_accounts(
                self.ctx, only, request.master_account_id, after[0] if after else None, limit
            ),
            lambda a: [a.account_id],
        )
        return billing_service_pb2.ListAccountsResponse(
            accounts=[convert.to_proto_account(a) for a in page], next_page_token=token
        )

    async def UpdateAccount(self, request, context):
        spec = convert.from_proto_update(request)

        async def work(uow):
            return convert.to_proto_account(await accounts.update_account(self.ctx, uow, spec))

        return await hiding_absence(
            self._idempotent("UpdateAccount", request, billing_pb2.Account, work)
        )

    async def TopUp(self, request, context):
        amount = convert.money_to_micros(request.amount, "amount")

        async def work(uow):
            # The standing as of now first, so its history is told in order.
            await standing.catch_up(self.ctx, uow, request.account_id, self.ctx.now())
            account = await accounts.top_up(
                self.ctx, uow, request.account_id, amount, request.amount.currency_code
            )
            return convert.to_proto_account(account)

        return await hiding_absence(self._idempotent("TopUp", request, billing_pb2.Account, work))

    async def SetBalanceAlert(self, request, context):
        threshold = (
            convert.money_to_micros(request.threshold, "threshold")
            if request.HasField("threshold")
            else None
        )

        async def work(uow):
            account = await accounts.set_balance_alert(
                self.ctx, uow, request.account_id, threshold, request.threshold.currency_code
            )
            return convert.to_proto_account(account)

        return await hiding_absence(
            self._idempotent("SetBalanceAlert", request, billing_pb2.Account, work)
        )

    async def SetSpendingCap(self, request, context):
        cap = (
            convert.money_to_micros(request.monthly_amount, "monthly_amount")
            if request.HasField("monthly_amount")
            else 0
        )

        async def work(uow):
            account = await accounts.set_spending_cap(
                self.ctx, uow, request.account_id, cap, request.monthly_amount.currency_code
            )
            return convert.to_proto_account(account)

        return await hiding_absence(
            self._idempotent("SetSpendingCap", request, billing_pb2.Account, work)
        )

    # --- catalog --------------------------------------------------------------------------

    async def ListOffers(self, request, context):
        catalog = self.ctx.catalog
        self.ctx.check_api(request.api, required=False)
        self.ctx.check_region(request.region, required=False)
        offers = sorted(catalog.offers_for(request.api, request.region), key=lambda o: o.id)
        page, token = paged_list(request, offers, lambda o: [o.id])
        return billing_service_pb2.ListOffersResponse(
            offers=[convert.to_proto_offer(o, catalog.currency) for o in page],
            next_page_token=token,
        )

    async def ListPriceTiers(self, request, context):
        catalog = self.ctx.catalog
        api = catalog.apis[self.ctx.check_api(request.api)]
        self.ctx.check_region(request.region, required=False)
        return billing_service_pb2.ListPriceTiersResponse(
            tiers=[
                convert.to_proto_tier(t, catalog.currency) for t in api.tiers_for(request.region)
            ],
            free_monthly_quantity=api.free_monthly_quantity,
        )

    # --- orders --------------------------------------------------------------------------

    async def PurchasePackage(self, request, context):
        spec = orders.PurchaseInput(
            account_id=request.account_id,
            offer_id=request.offer_id,
            region=request.region,
            enterprise_project_id=request.enterprise_project_id,
            effective_time=from_timestamp(request.effective_time, "effective_time")
            if request.HasField("effective_time")
            else None,
            auto_renew=request.auto_renew,
            quantity=orders.check_quantity(request.quantity),
        )

        async def work(uow):
            return order_message(await orders.purchase(self.ctx, uow, spec))

        paid = await hiding_absence(
            self._idempotent("PurchasePackage", request, billing_pb2.Order, work)
        )
        # Ask quota now; a retry of the request answers the order as it is now.
        return order_message(await fulfilment.fulfil(self.ctx, paid.order_id))

    async def RenewPackage(self, request, context):
        periods = renewals.check_periods(request.periods)

        async def work(uow):
            order = await renewals.renew(
                self.ctx, uow, request.account_id, request.package_id, periods
            )
            return order_message(order)

        placed = await hiding_absence(
            renewals.explained(
                self.ctx,
                request.account_id,
                self._idempotent("RenewPackage", request, billing_pb2.Order, work),
            )
        )
        # Ask quota now; a retry of the request answers the order as it is now.
        return order_message(await fulfilment.fulfil(self.ctx, placed.order_id))

    async def RenewPackages(self, request, context):
        package_ids = batch_renewals.check_package_ids(list(request.package_ids))
        if not request.HasField("expire_date"):
            raise InvalidArgument("expire_date", "expire_date is required")
        expire_date = convert.from_proto_date(request.expire_date, "expire_date")

        async def work(uow):
            order = await batch_renewals.renew_many(
                self.ctx, uow, request.account_id, package_ids, expire_date
            )
            return order_message(order)

        placed = await hiding_absence(
            renewals.explained(
                self.ctx,
                request.account_id,
                self._idempotent("RenewPackages", request, billing_pb2.Order, work),
            )
        )
        # Ask quota now; a retry of the request answers the order as it is now.
        return order_message(await fulfilment.fulfil(self.ctx, placed.order_id))

    async def SetAutoRenew(self, request, context):
        lead_days = renewals.check_lead_days(request.lead_days)

        async def work(uow):
            sold = await renewals.set_auto_renew(
                self.ctx, uow, request.package_id, request.enabled, lead_days
            )
            return convert.to_proto_auto_renewal(sold)

        return await hiding_absence(
            renewals.explained(
                self.ctx,
                None,
                self._idempotent(
                    "SetAutoRenew",
                    request,
                    billing_pb2.AutoRenewal,
                    work,
                    # The reply names no region: a replay is checked against the package's.
                    authorize=lambda uow, reply: renewals.check_package_scope(
                        uow, reply.package_id
                    ),
                ),
            )
        )

    async def GetAutoRenew(self, request, context):
        sold = await hiding_absence(renewals.get_auto_renew(self.ctx, request.package_id))
        return convert.to_proto_auto_renewal(sold)

    async def CancelOrder(self, request, context):
        order = await hiding_absence(fulfilment.cancel(self.ctx, request.order_id, _check_order))
        return order_message(order)

    async def GetOrder(self, request, context):
        order = await hiding_absence(
            self.ctx.db.read(lambda uow: orders.load_order(self.ctx, uow, request.order_id))
        )
        _check_order(order)
        return order_message(order)

    async def ListOrders(self, request, context):
        principal = current_principal()
        account_id = check_account_id(principal.scoped_account(request.account_id))
        page, token = await paged(
            request,
            lambda after, limit: orders.list_orders(
                self.ctx, account_id, after[0] if after else None, limit, principal.regions
            ),
            lambda o: [o.order_id],
        )
        return billing_service_pb2.ListOrdersResponse(
            orders=[order_message(o) for o in page], next_page_token=token
        )

    async def SubscribeApi(self, request, context):
        return await self._subscription("SubscribeApi", request, subscriptions.subscribe)

    async def UnsubscribeApi(self, request, context):
        return await self._subscription("UnsubscribeApi", request, subscriptions.unsubscribe)

    async def _subscription(self, scope, request, change):
        """Quota is told first, then billing's record is written under the request's key; a
        replay is answered from the stored reply and tells quota nothing."""
        replay = await self._idempotent.replay(scope, request, billing_pb2.ApiSubscription)
        if replay is not None:
            return replay

        def keep(record):
            async def work(uow):
                return convert.to_proto_subscription(await record(uow))

            return self._idempotent(scope, request, billing_pb2.ApiSubscription, work)

        return await hiding_absence(
            change(
                self.ctx, request.request_id, request.account_id, request.region, request.api, keep
            )
        )

    # --- auto-replenish (docs/design/auto-replenish.md) -----------------------------------

    async def SetAutoReplenish(self, request, context):
        """Quota's rule first, then billing's record under the request's key; a replay is
        answered from the stored reply and tells quota nothing."""
        scope, reply_type = "SetAutoReplenish", billing_pb2.AutoReplenish
        replay = await self._idempotent.replay(scope, request, reply_type)
        if replay is not None:
            return replay
        spec = replenish.ReplenishInput(
            account_id=request.account_id,
            region=request.region,
            api=request.api,
            offer_id=request.offer_id,
            below_quantity=request.below_quantity,
            max_per_month=request.max_per_month,
            enabled=request.enabled,
        )

        def keep(record):
            async def work(uow):
                return convert.to_proto_auto_replenish(await record(uow))

            return self._idempotent(scope, request, reply_type, work)

        return await hiding_absence(
            replenish.set_auto_replenish(self.ctx, request.request_id, spec, keep)
        )

    async def GetAutoReplenish(self, request, context):
        view = await hiding_absence(
            replenish.get_auto_replenish(self.ctx, request.account_id, request.region, request.api)
        )
        return convert.to_proto_auto_replenish(view)

    async def GetBill(self, request, context):
        regions = current_principal().regions
        shown = await hiding_absence(
            bills.shown_bill(
                self.ctx,
                request.account_id,
                request.month,
                regions,
                request.enterprise_project_id,
            )
        )
        return convert.to_proto_bill(shown, self.ctx.tz)

    async def ExportBill(self, request, context):
        regions = current_principal().regions
        csv = await hiding_absence(
            bills.export_bill(
                self.ctx,
                request.account_id,
                request.month,
                regions,
                request.enterprise_project_id,
            )
        )
        return billing_service_pb2.ExportBillResponse(csv=csv)

    # --- the console's account-wide views ----------------------------------------------

    async def GetAccountOverview(self, request, context):
        account_id = check_account_id(request.account_id)
        regions = current_principal().visible_regions(self.ctx.catalog.regions)
        seen = await hiding_absence(overview.overview(self.ctx, account_id, regions))
        return convert.to_proto_overview(seen)

    async def ListAccountPackages(self, request, context):
        account_id = check_account_id(request.account_id)
        region = self.ctx.check_region(request.region, required=False)
        api = self.ctx.check_api(request.api, required=False)
        known_states = set(quota_pb2.PackageState.values()) - {0}
        states = tuple(check_enum(s, known_states, "states") for s in request.states)
        regions = (
            (region,) if region else current_principal().visible_regions(self.ctx.catalog.regions)
        )
        # The token holds where the next page starts: a region and quota's own page token in
        # it (docs/design/billing.md, "Packages across regions").
        after = decode_page_token(request)
        if after is not None and not (len(after) == 2 and all(isinstance(x, str) for x in after)):
            raise InvalidArgument("page_token", "page_token is malformed")
        query = overview.PackageQuery(
            account_id, tuple(regions), api, states, request.enterprise_project_id
        )
        page = await hiding_absence(
            overview.list_packages(
                self.ctx, query, tuple(after) if after else None, page_size(request.page_size)
            )
        )
        return billing_service_pb2.ListAccountPackagesResponse(
            packages=[p.wire for p in page.packages],
            unavailable_regions=page.unavailable_regions,
            next_page_token=encode_page_token(list(page.next_position), request)
            if page.next_position
            else "",
        )

    async def ExplainBillLine(self, request, context):
        if not request.HasField("cycle_start_time"):
            raise InvalidArgument("cycle_start_time", "cycle_start_time is required")
        query = line_explanations.LineQuery(
            account_id=request.account_id,
            month=request.month,
            cycle_start_time=from_timestamp(request.cycle_start_time, "cycle_start_time"),
            region=request.region,
            api=request.api,
            visible_regions=current_principal().visible_regions(self.ctx.catalog.regions),
        )
        after = decode_page_token(request)
        if after is not None and not (len(after) == 1 and isinstance(after[0], str)):
            raise InvalidArgument("page_token", "page_token is malformed")
        # The policy checked the account field: the line's absence is the caller's own to know.
        page, more = await line_explanations.explain_line(
            self.ctx,
            query,
            after[0] if after else None,
            line_explanations.line_page_size(request.page_size),
        )
        return billing_service_pb2.ExplainBillLineResponse(
            events=[convert.to_proto_line_event(e) for e in page],
            next_page_token=encode_page_token([page[-1].usage.usage_event_id], request)
            if more and page
            else "",
        )

    async def RecommendPackages(self, request, context):
        account_id = check_account_id(request.account_id)
        found = await hiding_absence(
            recommendations.recommend_packages(
                self.ctx, account_id, request.region, request.api, request.months
            )
        )
        return what_if.to_proto_recommendation(found)

    async def WatchEvents(self, request, context):
        # A region-limited token sees its regions' events and those about no region (an
        # account's standing, its balance): docs/security.md.
        async for event in self.ctx.outbox.watch(
            request.after_sequence,
            request.event_types,
            stopped=context.done,
            regions=current_principal().regions,
        ):
            yield event
